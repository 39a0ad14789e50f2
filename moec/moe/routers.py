"""The router registry: one entry per ``router.kind`` a spec may name.

An entry holds everything the compiler knows about a kind of router:

- ``score_op`` and ``score_attrs``: the primitive op that turns router logits into scores
  in the unfused graph (its reference kernel is ``moec.backends.reference.routing``'s
  function of the same name), with its attributes;
- ``emit_scores``: the expression the torch backend writes for the same scores (of the
  logits; for a router that is not learned, of ``"<token ids>, <experts>"``);
- ``selection_bias``: a non-trainable per-expert bias added to the scores for selection
  only (parameter ``router.selection_bias``, moved by the trainer towards even load);
- ``expert_choice``: every expert picks its best tokens (the (token, expert) pairs are all
  candidates, and capacity keeps each expert's C best) instead of every token its top_k;
- ``learned``: false for a router with no weight: its score op reads the layer's ``router_in``
  directly (``token_id``: the token ids) and the scores stand in for the logits;
- ``group_limited``: the kind accepts ``router.groups`` / ``router.top_groups`` (DeepSeek's
  ``n_group`` / ``topk_group``): the experts in equal groups, a group's score the sum of its two
  best (selection-biased) scores, a token's top_k taken from its top_groups best groups only
  (the ``topk`` op's ``groups`` / ``top_groups`` attributes; ``select_grouped_experts`` in a
  program).

Every learned router also takes ``router.scale`` (DeepSeek's ``routed_scaling_factor``): the
combine weights times it, after renormalisation (op ``weight_scale``).

Adding a router kind is one entry here, its score kernel when no existing one fits, the
name in the schema's ``Router.kind`` literal, and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: attrs.py reads the registry
    from moec.moe.attrs import RouterAttrs


@dataclass(frozen=True)
class RouterKind:
    name: str
    doc: str
    score_op: str
    score_attrs: Callable[[RouterAttrs], dict]
    emit_scores: Callable[[RouterAttrs, str], str]  # (router, logits expression) -> scores expression
    selection_bias: bool = False
    expert_choice: bool = False
    learned: bool = True
    group_limited: bool = False


def _temperature(router: RouterAttrs) -> dict:
    return {"temperature": router.temperature}


def _tempered(router: RouterAttrs, logits: str) -> str:
    """``logits / temperature``; the logits alone at temperature 1."""
    return logits if router.temperature == 1.0 else f"{logits} / {router.temperature!r}"


def _softmax(router: RouterAttrs, logits: str) -> str:
    return f"torch.softmax({_tempered(router, logits)}, dim=-1)"


ROUTERS = {
    kind.name: kind
    for kind in (
        RouterKind(
            "topk", "softmax over experts, each token takes its top_k (Switch, Mixtral)",
            score_op="softmax", score_attrs=_temperature, emit_scores=_softmax, group_limited=True,
        ),
        RouterKind(
            "sigmoid_bias", "independent sigmoid scores; a selection-only bias balances the load (DeepSeek-V3)",
            score_op="sigmoid", score_attrs=_temperature,
            emit_scores=lambda r, logits: f"torch.sigmoid({_tempered(r, logits)})",
            selection_bias=True, group_limited=True,
        ),
        RouterKind(
            "sinkhorn", "Sinkhorn-balanced assignment over the batch, then top_k (BASE layers, the m library)",
            score_op="sinkhorn",
            score_attrs=lambda r: {"iters": r.sinkhorn_iters, "tau": r.sinkhorn_tau, "temperature": r.temperature,
                                   **({"topk": r.sinkhorn_topk} if r.sinkhorn_topk else {})},
            emit_scores=lambda r, logits: f"sinkhorn({logits}, {r.sinkhorn_iters}, {r.sinkhorn_tau!r}, {r.temperature!r}"
                                          f"{f', {r.sinkhorn_topk}' if r.sinkhorn_topk else ''})",
        ),
        RouterKind(
            "expert_choice", "softmax scores; each expert takes its C best tokens of the batch (Zhou et al. 2022)",
            score_op="softmax", score_attrs=_temperature, emit_scores=_softmax,
            expert_choice=True,
        ),
        RouterKind(
            "token_id", "no learned router: a token goes to expert table[id % len(table)], or id % experts (the complexity "
            "library's TokenRoutedMLP); one-hot scores, weight 1",
            score_op="token_route", score_attrs=lambda r: {"table": r.table} if r.table else {},
            emit_scores=lambda r, ids_and_experts: f"token_route({ids_and_experts}{f', {r.table!r}' if r.table else ''})",
            learned=False,
        ),
    )
}
