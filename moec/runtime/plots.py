"""PNG plots of a run from its metrics.jsonl: loss curves, expert utilisation, throughput."""

from __future__ import annotations

from pathlib import Path

from moec.runtime.metrics import read_metrics


def plot_run(run_dir: Path, notes: list | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl", notes)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training rows")
    written = [_loss(plt, run_dir, train, evals), _throughput(plt, run_dir, train)]
    if train[0].get("moe"):
        written.append(_utilisation(plt, run_dir, train))
    return written


def _loss(plt, run_dir, train, evals) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["step"] for r in train], [r["task_loss"] for r in train], lw=1, alpha=0.8, label="train (task loss)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", lw=2, label="validation")
        ratio = evals[-1].get("val_mse_over_last_value")
        if ratio:  # continuous data: the MSE of repeating the last value, for scale
            ax.axhline(evals[-1]["val_mse"] / ratio, ls="--", color="gray", label="repeat-last-value baseline")
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(f"{_title(run_dir)}: loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(plt, fig, run_dir / "loss.png")


def _throughput(plt, run_dir, train) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    steady = [r for r in train if not r.get("includes_compile")]  # a compiling step is not throughput
    ax.plot([r["step"] for r in steady], [r["tokens_per_s"] for r in steady], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{_title(run_dir)}: throughput")
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, run_dir / "throughput.png")


def _utilisation(plt, run_dir, train) -> Path:
    import numpy as np

    layers = list(train[0]["moe"])
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.6 * len(layers)), dpi=110, squeeze=False)
    steps = [r["step"] for r in train]
    for ax, layer in zip(axes[:, 0], layers):
        grid = np.array([r["moe"][layer]["utilization"] for r in train]).T  # [E, steps]
        experts = grid.shape[0]
        image = ax.imshow(grid * experts, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(grid.max() * experts)),
                          extent=(steps[0], steps[-1], experts - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"{layer}\nexpert", fontsize=8)
        fig.colorbar(image, ax=ax, label="load x E (1 = even)")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{_title(run_dir)}: expert utilisation per MoE layer")
    return _save(plt, fig, run_dir / "experts.png")


def _title(run_dir: Path) -> str:
    return run_dir.name.replace("$", r"\$")  # a '$' would start matplotlib mathtext


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
