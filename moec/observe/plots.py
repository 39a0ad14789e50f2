"""PNG plots of a run from its metrics.jsonl: loss curves, expert utilisation, throughput, step time.

Titles name the spec (from the run's spec.yaml) and the run directory. Noisy per-step curves
are drawn faint with an exponential moving average on top. The expert heat maps average
steps into at most ``MAX_COLUMNS`` columns; past ``MAX_LAYER_PANELS`` MoE layers they become
one map of layers x experts averaged over the run, so 64+ experts and 96 layers stay legible.
"""

from __future__ import annotations

from pathlib import Path

from moec.observe.metrics import read_metrics

EMA_WEIGHT = 0.9  # of the previous smoothed value; bias-corrected like TensorBoard's smoothing
MAX_COLUMNS = 200
MAX_LAYER_PANELS = 8


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
    if "time_s" in train[-1]:
        written.append(_step_time(plt, run_dir, [r for r in train if "time_s" in r]))
    return written


def _loss(plt, run_dir, train, evals) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps, losses = [r["step"] for r in train], [r["task_loss"] for r in train]
    ax.plot(steps, losses, lw=0.8, alpha=0.3, color="C0")
    ax.plot(steps, ema(losses), lw=1.8, color="C0", label=f"train (task loss, EMA {EMA_WEIGHT})")
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
    rates = [r["tokens_per_s"] for r in steady]
    ax.plot([r["step"] for r in steady], rates, lw=0.8, alpha=0.3, color="C1")
    ax.plot([r["step"] for r in steady], ema(rates), lw=1.8, color="C1", label=f"EMA {EMA_WEIGHT}")
    if len(steady) < len(train):
        ax.legend(title="the compiling first step is left out", fontsize=8, title_fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    from matplotlib.ticker import EngFormatter

    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_title(f"{_title(run_dir)}: throughput")
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, run_dir / "throughput.png")


def _step_time(plt, run_dir, train) -> Path:
    """The parts of each step's wall time (metrics.jsonl's time_s), stacked, under the step's own time."""
    from moec.observe.step_time import PARTS

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    steps = [r["step"] for r in train]
    parts = [part for part in PARTS if any(r["time_s"].get(part, 0.0) > 0 for r in train)]
    ax.stackplot(steps, *[[r["time_s"].get(part, 0.0) for r in train] for part in parts], labels=parts, alpha=0.8)
    ax.plot(steps, [r["time_s"]["step"] for r in train], color="black", lw=0.8, label="step (wall)")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title(f"{_title(run_dir)}: step time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    return _save(plt, fig, run_dir / "step_time.png")


def _utilisation(plt, run_dir, train) -> Path:
    import numpy as np

    layers = list(train[0]["moe"])
    if len(layers) > MAX_LAYER_PANELS:
        return _utilisation_by_layer(plt, run_dir, train, layers)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.6 * len(layers)), dpi=110, squeeze=False)
    steps = [r["step"] for r in train]
    for ax, layer in zip(axes[:, 0], layers):
        grid = step_bins(np.array([r["moe"][layer]["utilization"] for r in train]).T)  # [E, columns]
        experts = grid.shape[0]
        image = ax.imshow(grid * experts, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(grid.max() * experts)),
                          extent=(steps[0], steps[-1], experts - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"{layer}\nexpert", fontsize=8)
        ax.yaxis.set_major_locator(plt.MaxNLocator(8, integer=True))
        fig.colorbar(image, ax=ax, label="load x E (1 = even)")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{_title(run_dir)}: expert utilisation per MoE layer")
    return _save(plt, fig, run_dir / "experts.png")


def _utilisation_by_layer(plt, run_dir, train, layers) -> Path:
    """Many layers: one row per layer, the load of each expert averaged over the run."""
    import numpy as np

    grid = np.array([np.mean([r["moe"][layer]["utilization"] for r in train], axis=0) for layer in layers])  # [L, E]
    experts = grid.shape[1]
    fig, ax = plt.subplots(figsize=(9, 2 + 0.12 * len(layers)), dpi=110)
    image = ax.imshow(grid * experts, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(grid.max() * experts)),
                      interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.yaxis.set_major_locator(plt.MaxNLocator(12, integer=True))
    ax.xaxis.set_major_locator(plt.MaxNLocator(16, integer=True))
    fig.colorbar(image, ax=ax, label="load x E, mean over the run (1 = even)")
    ax.set_title(f"{_title(run_dir)}: expert utilisation, {len(layers)} MoE layers")
    return _save(plt, fig, run_dir / "experts.png")


def step_bins(grid, columns: int = MAX_COLUMNS):
    """[E, steps] -> [E, <= columns]: the mean of consecutive steps, so a long run stays one pixel per column."""
    import numpy as np

    if grid.shape[1] <= columns:
        return grid
    edges = np.linspace(0, grid.shape[1], columns + 1).astype(int)
    return np.stack([grid[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled towards 0)."""
    out, smoothed = [], 0.0
    for i, value in enumerate(values, start=1):
        smoothed = weight * smoothed + (1 - weight) * value
        out.append(smoothed / (1 - weight ** i))
    return out


def _title(run_dir: Path) -> str:
    """``spec name (run directory)`` from the run's spec.yaml, or the directory's name alone."""
    name = None
    try:
        import yaml

        name = yaml.safe_load((run_dir / "spec.yaml").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    title = f"{name} ({run_dir.name})" if name and name != run_dir.name else run_dir.name
    return str(title).replace("$", r"\$")  # a '$' would start matplotlib mathtext


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
