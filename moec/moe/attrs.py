"""``MoeAttrs``: everything a backend needs to know about one MoE layer, typed and frozen.

It is the attribute of the fused ``moe`` node (``moe=MoeAttrs(...)`` in ``ir.txt``) and the
input of :func:`moec.moe.decompose`; :func:`moe_attrs` makes it from the spec's ``MoeConfig``
and is the only place that reads MoE settings from a spec. Hidden sizes are not here: they
are the shapes of the expert parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.moe.anneal import AnnealAttrs, constant, schedule_of
from moec.moe.routers import ROUTERS


@dataclass(frozen=True)
class RouterAttrs:
    kind: str  # a key of moec.moe.routers.ROUTERS
    temperature: float = 1.0
    noise: str = "none"  # none | gaussian | gumbel, on the logits while training
    noise_std: float = 0.0
    normalize: bool = False  # renormalise the chosen weights to sum to 1
    sinkhorn_iters: int = 0
    sinkhorn_tau: float = 0.0
    bias_update_rate: float = 0.0  # selection-bias routers: the trainer's balancing step
    bias: bool = False  # a learned bias on the logits (parameter router.bias)
    norm: str = "none"  # none | rmsnorm | layernorm of the router input (parameters router.norm.*)
    dropout: float = 0.0  # training: per token, with this probability the best choice's weight is zeroed
    sinkhorn_topk: int = 0  # sinkhorn: each token's kernel keeps its topk highest logits (0: all)
    table: tuple[int, ...] = ()  # token_id: expert = table[id % len(table)]; empty: id % experts
    groups: int = 1  # group-limited routing: the experts in this many equal groups (DeepSeek's n_group)
    top_groups: int = 1  # ... and a token's experts taken from its top_groups best groups (topk_group); inert at groups 1
    scale: float = 1.0  # the combine weights times this, after renormalisation (DeepSeek's routed_scaling_factor)
    bands: int = 0  # spectral bands: the F bins in this many contiguous groups, each routed among its E / bands experts


@dataclass(frozen=True)
class CapacityAttrs:
    mode: str = "dropless"  # dropless | capacity
    factor: float = 0.0  # C = max(1, floor(factor * tokens * top_k / experts))
    tokens: int = 0  # > 0: capacity.tokens, C = tokens slots per expert instead of the factor's
    drop_policy: str = "none"  # zero | renormalize (capacity mode only)
    fallback_weight: float = 0.0  # > 0: capacity.fallback 'dense', a dense FFN (parameters fallback.*) for fully dropped tokens


@dataclass(frozen=True)
class ExpertAttrs:
    activation: str  # a key of moec.moe.activations.ACTIVATIONS
    bias: bool = False
    limit: float = 0.0  # clamped activations only (clamped_swiglu)
    alpha: float = 0.0
    init: str = "normal"  # the routed experts' weight init (moec.moe.params.init_of)

    @property
    def clamp(self) -> dict:
        """The ``clamped_glu`` attributes, empty for other activations."""
        return {"limit": self.limit, "alpha": self.alpha} if self.limit else {}


@dataclass(frozen=True)
class AuxAttrs:
    load_balance: float = 0.0
    z_loss: float = 0.0
    load_balance_scope: str = "layer"  # layer | sequence (per sequence, averaged) | model (the layer outputs its balance statistics; the model pools them)
    load_balance_batch: str = "local"  # local | global (expert counts summed over the data-parallel ranks)
    entropy: float = 0.0  # weight of the entropy reward -H(p)
    margin: float = 0.0  # weight of the margin reward -(p_top1 - p_top2)

    @property
    def pooled(self) -> bool:
        return self.load_balance_scope == "model"

    @property
    def per_sequence(self) -> bool:
        """DeepSeek-V3's sequence-wise balance loss: f_e and P_e over each sequence's tokens, the loss averaged over sequences."""
        return self.load_balance_scope == "sequence"


@dataclass(frozen=True)
class MoeAttrs:
    experts: int
    top_k: int
    router: RouterAttrs
    expert: ExpertAttrs
    capacity: CapacityAttrs = CapacityAttrs()
    aux: AuxAttrs = AuxAttrs()
    shared: bool = False  # shared experts: one FFN every token passes through
    shared_gate: bool = False  # the shared output scaled by sigmoid(h @ shared_gate.weight.T) (Qwen2-MoE)
    anneal: AnnealAttrs | None = None  # annealed settings: read from the router.anneal buffer (moec.moe.anneal)

    @property
    def choices(self) -> int:
        """(token, expert) pairs per token that routing considers: top_k, or every expert for expert choice."""
        return self.experts if ROUTERS[self.router.kind].expert_choice else self.top_k

    @property
    def dropless(self) -> bool:
        return self.capacity.mode == "dropless"


def moe_attrs(cfg) -> MoeAttrs:
    """The typed attributes of a resolved spec ``MoeConfig`` (``moec.schema.model``)."""
    router, capacity = cfg.router, cfg.capacity
    noisy = router.noise.kind != "none"
    anneal = AnnealAttrs(temperature=schedule_of(router.temperature), noise_std=schedule_of(router.noise.std) if noisy else None,
                         capacity_factor=schedule_of(capacity.factor))
    return MoeAttrs(
        experts=cfg.experts,
        top_k=cfg.top_k,
        router=RouterAttrs(
            kind=router.kind,
            temperature=1.0 if anneal.temperature else router.temperature,  # annealed: divided before the score op
            noise=router.noise.kind,
            noise_std=constant(router.noise.std) if noisy else 0.0,
            normalize=router.normalize,
            sinkhorn_iters=router.sinkhorn.iters if router.sinkhorn else 0,
            sinkhorn_tau=router.sinkhorn.tau if router.sinkhorn else 0.0,
            bias_update_rate=router.bias_update_rate or 0.0,
            bias=router.bias,
            norm=router.norm,
            dropout=router.dropout,
            sinkhorn_topk=(router.sinkhorn.topk or 0) if router.sinkhorn else 0,
            table=tuple(router.table or ()),
            groups=router.groups,
            top_groups=router.top_groups or router.groups,
            scale=router.scale,
        ),
        expert=_expert_attrs(cfg.expert),
        capacity=CapacityAttrs(mode=capacity.mode, factor=constant(capacity.factor), tokens=capacity.tokens or 0,
                               drop_policy=capacity.drop_policy or "none",
                               fallback_weight=(capacity.fallback_weight or 1.0) if capacity.fallback == "dense" else 0.0),
        aux=AuxAttrs(load_balance=cfg.aux.load_balance, z_loss=cfg.aux.z_loss, load_balance_scope=cfg.aux.load_balance_scope,
                     load_balance_batch=cfg.aux.load_balance_batch,
                     entropy=cfg.aux.entropy, margin=cfg.aux.margin),
        shared=cfg.shared_experts is not None,
        shared_gate=cfg.shared_experts is not None and cfg.shared_experts.gate,
        anneal=anneal if anneal != AnnealAttrs() else None,
    )


def _expert_attrs(expert) -> ExpertAttrs:
    clamped = expert.activation == "clamped_swiglu"
    return ExpertAttrs(activation=expert.activation, bias=expert.bias, limit=expert.swiglu_limit if clamped else 0.0,
                       alpha=expert.swiglu_alpha if clamped else 0.0, init=expert.init)
