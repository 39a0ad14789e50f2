"""Source of the fused ``spectral_moe`` function: rfft over the sequence, the inner ``moe`` function ``depth`` times
with one set of weights, irfft. Under context parallelism (``sharding.sequence``) the function takes the cp
group's ``SequenceShards`` and runs the distributed rfft (``moec.backends.torch.context_parallel``): all-to-alls
around the local transforms, visible in the function, and the aux loss scaled by the rank's share of the bins.
"""

from __future__ import annotations

from moec.backends.torch.codegen_moe import DFT_MAX_SEQ, slot_arg
from moec.moe import BAND_TABLE


def spectral_function(name: str, moe_name: str, attrs: dict, kernel: str, batch_group: bool = False,
                      context: bool = False) -> list[str]:
    """``batch_group``: the inner MoE function sums its expert counts over the data-parallel group; ``context``:
    the spec splits the sequence, the function takes the cp group's ``SequenceShards`` (None: one process)."""
    slots = list(attrs["slots"])
    args = ", ".join(slot_arg(s) for s in slots)
    moe_args = ", ".join(slot_arg(s) for s in inner_slots(slots)[2:])
    norm = attrs["fft_norm"]
    residual = attrs.get("residual", True)
    use_dft = {"auto": f"seq <= {DFT_MAX_SEQ}", "dft": "True", "fft": "False"}[kernel]
    bins = "bins" if context else ": z.shape[1]"
    router_in = {"embedding": f"z + {slot_arg(BAND_TABLE)}[{bins}]", "none": "z",
                 "index_feature": "band_index(z, bins.start, seq // 2 + 1)" if context else "band_index(z)"}[attrs["band"]]
    seq = ["    seq = x.shape[1] if context is None else x.shape[1] * context.size  # the whole sequence's length"] \
        if context else ["    seq = x.shape[1]"]
    return [
        f"def {name}({args}, training: bool{', context=None' if context else ''}):",
        f'    """rfft over the sequence, {attrs["depth"]} x ({"z + moe(z)" if residual else "moe(z)"}) with one set of weights, irfft."""',
        *seq,
        f"    use_dft = {use_dft}  # DFT as matmuls for short sequences, else torch.fft",
        *(_context_rfft(norm) if context else [f"    z = rfft_real(x, {norm!r}, use_dft)  # (B, F, 2D): real parts, then imaginary parts"]),
        "    aux, stats = None, []",
        f"    for _ in range({attrs['depth']}):",
        f"        y, step_aux, step_stats = {moe_name}(z, {router_in}, {moe_args}, training{', batch_group' if batch_group else ''})",
        "        z = z + y" if residual else "        z = y  # residual: false",
        "        aux = step_aux if aux is None else aux + step_aux",
        "        stats.append(step_stats)",
        *(_context_irfft(norm) if context else
          [f"    return irfft_real(z, seq, {norm!r}, use_dft), aux, mean_stats(stats)  # stats: mean over steps"]),
    ]


def _context_rfft(norm: str) -> list[str]:
    """The spectral tokens of a sequence split over the cp group: two all-to-alls around the local rfft."""
    return [
        "    if context is None:",
        f"        z = rfft_real(x, {norm!r}, use_dft)  # (B, F, 2D): real parts, then imaginary parts",
        "        bins, share = slice(0, z.shape[1]), 1.0",
        "    else:  # context parallel: all-to-all to (B, S, D/cp), the rfft, all-to-all to this rank's bins (B, F_r, 2D)",
        f"        z = context.to_bins(rfft_real(context.to_channels(x), {norm!r}, use_dft), seq)",
        "        bins, share = context.bins(seq), context.bin_share(seq)  # aux x share, averaged over cp: the mean over every bin",
    ]


def _context_irfft(norm: str) -> list[str]:
    return [
        "    if context is None:",
        f"        return irfft_real(z, seq, {norm!r}, use_dft), aux, mean_stats(stats)  # stats: mean over steps",
        "    # context parallel: all-to-all to (B, F, 2D/cp), the irfft, all-to-all to this rank's positions (B, S/cp, D)",
        f"    x = context.from_channels(irfft_real(context.from_bins(z, seq), seq, {norm!r}, use_dft))",
        "    return x, aux * share, mean_stats(stats)",
    ]


def inner_slots(slots) -> tuple[str, ...]:
    """The slots of the ``moe`` inside a spectral node: ``h``, ``router_in``, then its parameters."""
    return ("h", "router_in", *[slot for slot in slots[1:] if slot != BAND_TABLE])
