"""``kernels.moe: auto`` by measurement: each MoE layer gets the fastest kernel that can serve it, timed
once on the device, dtype and shapes of the run, and kept in a table on disk.

For every distinct ``moe`` layer of a single-process spec the candidates (``candidate_kernels``:
grouped_mm and eager always, bmm with capacity, Triton on CUDA where it is installed) each run
forward + backward of that one layer at the spec's tokens per micro-batch, interleaved, a few
repetitions; the lowest median wins. The table (every candidate's median and the choice) is
kept in ``$MOEC_CACHE_DIR/kernel-choice.json`` under a key naming the device, dtypes, torch and
the layer's shape (D, H, E, top-k, tokens, activation, capacity mode, and a digest of its other
fields), written atomically; a later build with the same key reads it and picks the same kernel
without timing anything, so the program only changes when the table does.

Not measured, with the reason in the printed line (the fixed rule instead: grouped_mm when
dropless, bmm with capacity): ``schedule.kernels.measure: false``; ``MOEC_KERNEL_CHOICE=fixed``
in the environment (how the tests keep programs deterministic); a spec run by several
processes (each would time alone and could disagree); no such device on this machine (a build
for CUDA on a CPU box). A forced ``kernels.moe: NAME`` reads and writes no table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moec.moe import moe_attrs

CACHE_NAME = "kernel-choice.json"
TABLE_VERSION = 1
REPS = 5
ENV = "MOEC_KERNEL_CHOICE"  # "fixed": never measure (tests, CI)
NO_MOE_LAYER = "no moe layer"


@dataclass(frozen=True)
class LayerChoice:
    layer: str  # "model.blocks[0].layers[1]"
    key: str  # the table's key: device, dtypes, torch, shape
    kernel: str
    timings_ms: dict[str, float]  # each candidate's median
    source: str  # measured (timed now) | cached (read from the table)


@dataclass(frozen=True)
class KernelChoice:
    requested: str  # the spec's kernels.moe
    layers: tuple[LayerChoice, ...] = ()
    note: str = ""  # why nothing was measured
    cache: Path | None = None
    by_attrs: dict = field(default_factory=dict, compare=False)  # MoeAttrs -> kernel, for the code generator

    @property
    def worth_saying(self) -> bool:
        """Whether build / train print ``line()``: the spec has a token-routed moe layer."""
        return self.note != NO_MOE_LAYER

    def line(self) -> str:
        """One line for the build / train log."""
        if self.requested != "auto":
            return f"kernels.moe {self.requested} (forced by the spec)"
        if not self.layers:
            return f"kernels.moe auto -> fixed rule, not measured ({self.note})"
        parts = [_layer_part(choice, len(self.layers) > 1) for choice in self.layers]
        where = f"; table in {self.cache}" if self.cache else ""
        return "kernels.moe auto -> " + "; ".join(parts) + where

    def record(self) -> dict:
        """The manifest's ``kernel_choice``."""
        return {"requested": self.requested, "note": self.note, "cache": str(self.cache) if self.cache else None,
                "layers": [{"layer": c.layer, "key": c.key, "kernel": c.kernel, "source": c.source, "timings_ms": c.timings_ms}
                           for c in self.layers]}


def _layer_part(choice: LayerChoice, named: bool) -> str:
    label = f"{choice.layer}: " if named else ""
    times = ", ".join(f"{name} {format_ms(ms)} ms" for name, ms in sorted(choice.timings_ms.items(), key=lambda item: item[1]))
    return f"{label}{choice.kernel} ({choice.source}: {times})"


def format_ms(ms: float) -> str:
    """Three significant digits, never in exponent form: 0.0412, 3.1, 1260."""
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def cache_path() -> Path:
    from moec.backends.torch.loader import cache_dir

    return cache_dir() / CACHE_NAME


def candidate_kernels(dropless: bool, device_type: str) -> tuple[str, ...]:
    """The kernels validation admits for a layer, less Triton off CUDA (its CPU interpreter is no candidate)."""
    from moec.backends.triton import AVAILABLE

    kernels = ("grouped_mm", "eager") + (() if dropless else ("bmm",))
    return kernels + (("triton",) if device_type == "cuda" and AVAILABLE else ())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def not_measured_reason(spec, device: str) -> str | None:
    """Why ``auto`` takes the fixed rule for this spec here; None: measure."""
    if not spec.schedule.kernels.measure:
        return "schedule.kernels.measure is false"
    if os.environ.get(ENV) == "fixed":
        return f"{ENV}=fixed in the environment"
    if spec.mesh.world_size > 1:
        return f"{spec.mesh.world_size} processes would each time alone and could disagree"
    if spec.sharding.experts or spec.sharding.tensor is not None:
        return "experts split by sharding run grouped_mm"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "building for cuda on a machine without a CUDA device"
    return None


def choose_moe_kernels(spec, device: str, log=None) -> KernelChoice:
    """The kernel of each distinct ``moe`` layer for ``kernels.moe: auto`` (forced or fixed: no timing)."""
    requested, layers = spec.schedule.kernels.moe, _moe_layers(spec)
    if not layers:
        return KernelChoice(requested, note=NO_MOE_LAYER)
    if requested != "auto":
        return KernelChoice(requested)
    reason = not_measured_reason(spec, device)
    if reason is not None:
        return KernelChoice(requested, note=reason)
    table, path = read_table(log), cache_path()
    choices, by_attrs = [], {}
    for where, cfg, layer_yaml in layers:
        key = table_key(spec, cfg, layer_yaml, device)
        entry = table.get(key)
        if entry is None or entry["kernel"] not in candidate_kernels(cfg.capacity.mode == "dropless", torch.device(device).type):
            timings = measure_layer(spec, cfg, layer_yaml, device, log=log)
            entry = {"kernel": min(timings, key=timings.get), "timings_ms": timings}
            table = write_entry(path, key, entry)
            choices.append(LayerChoice(where, key, entry["kernel"], timings, "measured"))
        else:
            choices.append(LayerChoice(where, key, entry["kernel"], entry["timings_ms"], "cached"))
        by_attrs[moe_attrs(cfg)] = entry["kernel"]
    return KernelChoice(requested, tuple(choices), cache=path, by_attrs=by_attrs)


def _moe_layers(spec) -> list[tuple[str, object, str]]:
    """(where, the layer's config, the layer as a YAML flow mapping) per distinct ``moe`` layer."""
    seen, out = set(), []
    for b, i, layer in spec.model.layers():
        if layer.kind != "moe":
            continue
        attrs = moe_attrs(layer)
        if attrs in seen:  # the generated program shares one function between these layers
            continue
        seen.add(attrs)
        fields = layer.model_dump(mode="json", exclude_unset=True, exclude={"name"})  # a name changes no timing
        out.append((f"model.blocks[{b}].layers[{i}]", layer, json.dumps(fields, sort_keys=True)))
    return out


def tokens_per_step(spec) -> int:
    """Tokens one process runs through a layer per forward: a micro-batch."""
    return spec.train.batch // spec.train.grad_accum * spec.train.seq_len


def device_label(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"cuda {torch.cuda.get_device_name(dev)} sm{major}{minor}"
    return f"{dev.type} {_cpu_model()} x{torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(spec, cfg, layer_yaml: str, device: str) -> str:
    precision = spec.schedule.precision
    hidden = cfg.expert.hidden or 4 * spec.model.d_model
    capacity = "dropless" if cfg.capacity.mode == "dropless" else "capacity"
    digest = hashlib.sha256(layer_yaml.encode()).hexdigest()[:12]
    return (f"{device_label(device)} | params {precision.params} compute {precision.compute} | torch {torch.__version__} | "
            f"D={spec.model.d_model} H={hidden} E={cfg.experts} top-{cfg.top_k} N={tokens_per_step(spec)} "
            f"{cfg.expert.activation} {capacity} | layer {digest}")


def measure_layer(spec, cfg, layer_yaml: str, device: str, reps: int | None = None, log=None) -> dict[str, float]:
    """Median ms of forward + backward of this one layer with each candidate kernel, interleaved."""
    from moec.bench.layers import LayerShape, MoecLayer, layer_spec_text, step_of
    from moec.bench.timing import interleaved
    from moec.dtypes import DTYPES

    dev = torch.device(device)
    precision = spec.schedule.precision
    dtype = DTYPES[precision.params]
    autocast = DTYPES.get(precision.compute) if precision.compute != precision.params else None
    shape = LayerShape(tokens_per_step(spec), spec.model.d_model, cfg.expert.hidden or 4 * spec.model.d_model, cfg.experts, cfg.top_k)
    torch.manual_seed(0)
    x = torch.randn(1, shape.tokens, shape.width, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, shape.tokens, shape.width, device=dev)
    steps = {}
    for kernel in candidate_kernels(cfg.capacity.mode == "dropless", dev.type):
        try:  # a candidate that fails here (e.g. a Triton kernel this GPU cannot compile) is no candidate
            steps[kernel] = step_of(MoecLayer(layer_spec_text(shape, layer_yaml, kernel), dev, dtype).train(), x, grad, autocast)
            steps[kernel]()
        except Exception as err:  # noqa: BLE001 - whatever it raised, the others still run
            steps.pop(kernel, None)
            if log:
                log(f"warning: kernels.moe auto: {kernel} failed on {device} ({type(err).__name__}: {str(err)[:120]}); not a candidate")
    timings = interleaved(steps, dev, reps or REPS, warmup=2)
    return {t.name: round(t.median_s * 1e3, 4) for t in timings}


def read_table(log=None) -> dict[str, dict]:
    """The cached table; a file that is not one is ignored (one line to ``log``) and rewritten on the next write."""
    path = cache_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    try:
        data = json.loads(text)
        entries = data["entries"]
        assert data["version"] == TABLE_VERSION and all(_valid_entry(e) for e in entries.values())
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
        if log:
            log(f"warning: ignoring {path}: not a moec kernel-choice table (version {TABLE_VERSION}); measuring again")
        return {}
    return entries


def _valid_entry(entry) -> bool:
    from moec.backends.torch.codegen_moe import KERNELS

    timings = entry.get("timings_ms")
    return (entry.get("kernel") in KERNELS and isinstance(timings, dict) and entry["kernel"] in timings
            and all(isinstance(v, (int, float)) for v in timings.values()))


def write_entry(path: Path, key: str, entry: dict) -> dict[str, dict]:
    """Add ``entry`` to the table on disk (read again first: another process may have added rows), atomically."""
    table = read_table() | {key: entry}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": TABLE_VERSION, "entries": table}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:  # a read-only cache: the choice holds for this run only
        pass
    return table
