"""What context parallelism (``sharding.sequence``) exchanges over the cp group, layer by layer.

``exchange`` names the collectives a node runs (``annotate_sharding`` puts it on the node, so ir.txt
shows it); ``context_record`` is the manifest's ``context_parallel``: how many collectives one forward
runs and the elements one rank sends per sequence of ``train.seq_len``, the backward sending as much
again (an all-gather's backward reduce-scatters, an all-to-all's is the reverse all-to-all).

- attention: keys and values all-gathered, each rank sending its S/cp rows to the cp - 1 others;
- spectral_moe: four all-to-alls, each rank keeping 1/cp of what it holds: sequence -> channels
  ((B, S/cp, D) -> (B, S, D/cp)), rfft, channels -> bins ((B, F, 2D/cp) -> (B, F_r, 2D)), the
  experts, and back the same way;
- select_last (head.pool 'last'): rank 0's last position all-gathered;
- moe, spectral_moe: the expert counts (and the token count) all-reduced, once per routing step.
"""

from __future__ import annotations

from moec.dtypes import BYTES
from moec.ir.graph import Graph, Node

EXCHANGES = {
    "attention": "all_gather(k, v) over {axis}",
    "spectral_moe": "all_to_all over {axis}: sequence -> channels, rfft, -> bins; experts; bins -> channels, irfft, -> sequence",
    "select_last": "all_gather(last position) over {axis}: cp rank 0 holds it",
}


def context_axis(spec) -> tuple[str, int] | None:
    """The context-parallel axis and its size, when the spec splits the sequence over more than one rank."""
    axis = next((a for a in spec.sharding.sequence if spec.mesh.axes.get(a, 1) > 1), None)
    return (axis, spec.mesh.axes[axis]) if axis else None


def exchange(node: Node, axis: str) -> str | None:
    return EXCHANGES[node.op].format(axis=axis) if node.op in EXCHANGES else None


def _collectives(node: Node) -> dict[str, int]:
    counts = {"attention": {"all_gather": 2}, "spectral_moe": {"all_to_all": 4}, "select_last": {"all_gather": 1}}.get(node.op, {})
    steps = node.attr["depth"] if node.op == "spectral_moe" else 1
    if node.op in ("moe", "spectral_moe") and node.attr["moe"].aux.load_balance > 0:
        counts = counts | {"all_reduce": steps}
    return counts


def _elements_sent(graph: Graph, node: Node, seq: int, cp: int) -> float:
    """Elements one rank sends in one forward for one sequence of ``seq``."""
    if node.op == "attention":
        kv_width = graph.type_of(node.inputs[1]).shape[-1]
        return 2 * (cp - 1) * (seq / cp) * kv_width
    if node.op == "select_last":
        return (cp - 1) * node.types[0].shape[-1]
    if node.op == "spectral_moe":
        width, bins = node.types[0].shape[-1], seq // 2 + 1
        positions = (seq / cp) * width * (cp - 1) / cp  # of its S/cp positions x D, all but its own channels
        spectrum = bins * 2 * width / cp * (cp - 1) / cp  # of every bin x its 2D/cp channels, all but its own bins (about)
        return 2 * (positions + spectrum)
    return 0.0


def context_record(spec, graph: Graph) -> dict | None:
    found = context_axis(spec)
    if found is None:
        return None
    axis, cp = found
    seq, collectives, sent = spec.train.seq_len, {}, 0.0
    for node in graph.nodes:
        for kind, count in _collectives(node).items():
            collectives[kind] = collectives.get(kind, 0) + count
        sent += _elements_sent(graph, node, seq, cp)
    sent_bytes = round(sent * BYTES[spec.schedule.precision.compute])
    return {"axis": axis, "size": cp, "seq_len": seq, "collectives_per_forward": dict(sorted(collectives.items())),
            "bytes_sent_per_rank_per_sequence": {"forward": sent_bytes, "training": 2 * sent_bytes}}
