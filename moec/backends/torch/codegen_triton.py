"""Lines of a fused ``moe`` function that call moec's Triton kernels (``kernels.moe: triton``).

``codegen_moe.moe_function`` asks this module for:

- the router (``router_lines``): for the softmax (``topk``) and sigmoid (``sigmoid_bias``)
  routers, one kernel from logits to scores, top-k weights (renormalised when the spec says
  so), choices and per-block expert counts; other routers, and group-limited ones
  (``router.groups`` > 1), keep their torch lines;
- the permutation (``permutation_lines``): rows sorted by expert from counts and prefix sums,
  no argsort; with capacity the dropped choices form a last group that is never computed;
- the experts' first projection with their biases and the activation in its epilogue, then
  the down projection (``ffn_lines``; every activation of the registry: silu / gelu / relu,
  gated or not, and the clamped SwiGLU);
- the combine (``combine_line``): each token's k rows times their weights, in choice order.
"""

from __future__ import annotations

from moec.moe import ACTIVATIONS, ROUTERS, MoeAttrs
from moec.moe.activations import triton_epilogue

FUSED_SCORES = {"softmax": False, "sigmoid": True}  # a router's score op -> the kernel's SIGMOID flag


def fuses_router(moe: MoeAttrs) -> bool:
    """The fused kernel takes a plain top-k; a group-limited router keeps its torch lines (``select_grouped_experts``)
    before the Triton permutation and experts. ``router.scale`` is a torch line after either."""
    kind = ROUTERS[moe.router.kind]
    return kind.learned and not kind.expert_choice and kind.score_op in FUSED_SCORES and moe.router.groups == 1


def _tile_arg(tiles: tuple[int, ...]) -> str:
    return f", tiles={tiles!r}" if tiles else ""


def router_block(moe: MoeAttrs, tiles: tuple[int, ...]) -> int:
    from moec.backends.triton.routing import (
        router_block as block,  # imports torch only, not triton
    )

    return block(moe.top_k, moe.experts, tiles)


def router_lines(moe: MoeAttrs, logits: str, selection_bias: bool, tiles: tuple[int, ...]) -> list[str]:
    """scores, weights, chosen and block_counts from the fused router (renormalised here unless router dropout comes first)."""
    router = moe.router
    normalize = router.normalize and router.dropout == 0
    sigmoid = FUSED_SCORES[ROUTERS[router.kind].score_op]
    bias = ", router_selection_bias" if selection_bias else ", None"
    return [
        (f"    scores, weights, chosen, block_counts = triton_moe.route({logits}, {moe.top_k}, {sigmoid}, {router.temperature!r}, "
         f"{normalize}{bias}, block={router_block(moe, tiles)})  # (N, E), (N, k), (N, k), (blocks, E): one kernel"),
    ]


def counts_line() -> str:
    return "    counts = block_counts.sum(0)  # (E,) tokens per expert: the router's per-block counts summed"


def permutation_lines(moe: MoeAttrs, fused_router: bool, tiles: tuple[int, ...]) -> list[str]:
    """dest (row of each (token, choice)), order (its inverse) and group_sizes (rows per expert), without a sort."""
    E, k = moe.experts, moe.choices
    if not moe.dropless:
        return [
            f"    dest, order, totals = triton_moe.permute(torch.where(kept, flat_expert, {E}), {E + 1})  # sort-free; dropped choices last",
            f"    group_sizes = totals[:{E}]  # each expert's kept rows",
        ]
    if fused_router:
        rows = router_block(moe, tiles) * k
        return [(f"    dest, order, group_sizes = triton_moe.permute(flat_expert, {E}, block_counts, {rows})  # sort-free: the router's "
                 "counts, prefix sums, in-block ranks")]
    return [f"    dest, order, group_sizes = triton_moe.permute(flat_expert, {E})  # sort-free: counts, prefix sums, in-block ranks"]


def ffn_lines(moe: MoeAttrs, tiles: tuple[int, ...]) -> list[str]:
    kind = ACTIVATIONS[moe.expert.activation]
    triton_epilogue(kind.name)  # every registry entry has one (a KeyError names the one that does not)
    # A gated kernel reads w_gate_up [E, 2, H, D] in place, gate half first (glu.py)
    weight, bias = ("experts_w_gate_up", "experts_b_gate_up") if kind.gated else ("experts_w_up", "experts_b_up")
    tile = _tile_arg(tiles)
    act = f"{kind.name!r}{tile}" + (f", limit={moe.expert.limit!r}, alpha={moe.expert.alpha!r}" if kind.clamped else "")
    if moe.expert.bias:
        act += f", bias={bias}"
    return [
        (f"    hidden = triton_moe.grouped_glu(x, {weight}, group_sizes, order, {moe.choices}, {act})"
         f"  # {moe.expert.activation} in the GEMM's epilogue"),
        f"    y_sorted = triton_moe.grouped_linear(hidden, experts_w_down, group_sizes{tile}{', bias=experts_b_down' if moe.expert.bias else ''})",
    ]


def combine_line(tiles: tuple[int, ...]) -> str:
    return f"    out = triton_moe.combine(y_sorted, weights, dest{_tile_arg(tiles)})  # combine: each token's choices summed in order"
