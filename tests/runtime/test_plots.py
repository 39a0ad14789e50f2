"""Plots stay legible: EMA over faint raw curves, spec names in titles, 64+ experts and many layers."""

import json
import struct

import pytest

from moec.observe.plots import ema, plot_run, step_bins


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def write_run(run_dir, layers: int, experts: int, steps: int):
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text("# resolved by moec\nversion: 1\nname: wide_moe\n")
    rows = []
    for step in range(1, steps + 1):
        load = [(1.0 + (e % 4) / 4) for e in range(experts)]
        share = [x / sum(load) for x in load]
        moe = {f"blocks.{i}.moe": {"utilization": share, "dropped_fraction": 0.0, "gate_entropy": 1.0} for i in range(layers)}
        rows.append({"kind": "train", "step": step, "task_loss": 5.0 / step ** 0.3, "tokens_per_s": 1000.0 + step, "moe": moe,
                     **({"includes_compile": True, "tokens_per_s": 3.0} if step == 1 else {})})
    rows.append({"kind": "eval", "step": steps, "val_loss": 1.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("layers", [2, 24])
def test_64_experts_over_many_steps_and_layers_make_bounded_readable_images(tmp_path, layers):
    run = tmp_path / "run"
    write_run(run, layers=layers, experts=64, steps=600)
    written = plot_run(run)
    assert [p.name for p in written] == ["loss.png", "throughput.png", "experts.png"]
    width, height = png_size(run / "experts.png")
    assert 800 <= width <= 1100 and 300 <= height <= 1000, (width, height)


def test_ema_is_bias_corrected_and_smooths():
    assert ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0 at the start
    smoothed = ema([0.0, 10.0] * 50)
    assert max(smoothed[10:]) - min(smoothed[10:]) < 2.0


def test_step_bins_average_consecutive_steps():
    import numpy as np

    grid = np.arange(2 * 1000, dtype=float).reshape(2, 1000)
    binned = step_bins(grid, columns=200)
    assert binned.shape == (2, 200) and binned[0, 0] == pytest.approx(2.0) and binned[1, -1] == pytest.approx(1997.0)
