"""The spec of a ``moe`` layer: router, experts, capacity, auxiliary losses (``MoeConfig`` is shared with spectral_moe)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from moec.layers.fields import DEFAULT_HIDDEN, Activation, LayerName, default_hidden, no_dropout
from moec.moe.routers import ROUTERS
from moec.schema.base import MAX_DIM, Base, Dim, NonNegFloat, PosFloat, PosInt, Prob, field_error

# The names of moec.moe.ROUTERS (tests keep them equal); the registry says what each one computes.
RouterKind = Literal["topk", "sinkhorn", "sigmoid_bias", "expert_choice", "token_id"]


class Anneal(Base):
    """A value annealed over training: ``start`` at step 0, ``end`` from step ``steps`` on (linear or cosine in between)."""

    start: NonNegFloat
    end: NonNegFloat
    steps: PosInt
    kind: Literal["linear", "cosine"] = "linear"

    def positive(self, name: str) -> None:
        if self.start <= 0 or self.end <= 0:
            raise field_error(name, f"start and end must be > 0, got {self.start} and {self.end}")


def annealable(number):
    """A number, or an ``Anneal`` mapping; a mapping is checked as an Anneal only (one error, not one per branch)."""
    return Annotated[Union[Annotated[number, Tag("value")], Annotated[Anneal, Tag("anneal")]],
                     Discriminator(lambda v: "anneal" if isinstance(v, (dict, Anneal)) else "value")]


class Noise(Base):
    """Exploration noise added to router logits while training."""

    kind: Literal["none", "gaussian", "gumbel"] = "none"
    std: annealable(NonNegFloat) = Field(1.0, description="Scale of the noise (std for gaussian, beta for gumbel); or {start, end, steps, kind}.")


class Sinkhorn(Base):
    """Sinkhorn-Knopp balancing of the token x expert assignment."""

    iters: Annotated[int, Field(ge=1, le=100)] = 5
    tau: PosFloat = Field(0.7, description="Temperature of the kernel exp(logits / tau).")
    topk: PosInt | None = Field(None, description="Candidate restriction (the m library's sinkhorn_topk): each token's "
                                "kernel keeps only its topk highest logits (top_k <= topk <= experts). null: every expert.")


# Options of learned router logits, with the value that leaves them out (token_id accepts only that).
_LEARNED_ROUTER_OPTIONS = {"temperature": 1.0, "noise": Noise(), "normalize": False, "bias": False, "norm": "none", "dropout": 0.0,
                           "scale": 1.0}
_GROUP_LIMITED = " and ".join(f"'{name}'" for name, kind in ROUTERS.items() if kind.group_limited)


class Router(Base):
    """How tokens choose experts."""

    kind: RouterKind = "topk"
    temperature: annealable(PosFloat) = Field(1.0, description="Divides the logits before the scores; or annealed {start, end, steps, kind}.")
    noise: Noise = Field(default_factory=Noise)
    normalize: bool = Field(True, description="Renormalise the chosen experts' weights to sum to 1.")
    bias: bool = Field(False, description="A learned per-expert bias on the router logits (GPT-OSS).")
    sinkhorn: Sinkhorn | None = Field(None, description="Only with kind: sinkhorn (default iters 5, tau 0.7).")
    norm: Literal["none", "rmsnorm", "layernorm"] = Field(
        "none", description="A normalisation of the router input (its own weight, eps 1e-5) before the logits (the m library's use_router_ln).")
    dropout: Prob = Field(0.0, description="Router dropout (the m library's router_dropout_prob): while training, with this "
                          "probability per token the best choice's weight is zeroed, so the token goes to its second-best (needs top_k >= 2).")
    bias_update_rate: NonNegFloat | None = Field(
        None, description="Only with kind: sigmoid_bias: step of the selection-only balancing bias (default 1e-3)."
    )
    table: Annotated[list[Annotated[int, Field(ge=0, le=MAX_DIM)]], Field(min_length=1, max_length=MAX_DIM)] | None = Field(
        None, description="Only with kind: token_id: a fixed routing table, token id t goes to expert table[t % len(table)] "
        "(len(table) <= vocab). null: expert t % experts (the complexity library's TokenRoutedMLP).")
    groups: PosInt = Field(1, description="Group-limited routing (DeepSeek's n_group; kinds topk and sigmoid_bias): the experts in this "
                           "many equal groups, a group's score the sum of its two best (selection-biased) scores; a token chooses "
                           "only among the experts of its top_groups best groups. 1: no limit.")
    top_groups: PosInt | None = Field(None, description="With groups > 1 (required there): how many groups a token's experts come "
                                      "from (DeepSeek's topk_group), top_k <= top_groups * experts / groups. Default: groups.")
    scale: PosFloat = Field(1.0, description="The combine weights times this, after renormalisation (DeepSeek's routed_scaling_factor).")

    @model_validator(mode="after")
    def _options_match_kind(self) -> "Router":
        if isinstance(self.temperature, Anneal):
            self.temperature.positive("temperature")
        if self.sinkhorn is not None and self.kind != "sinkhorn":
            raise field_error("sinkhorn", f"is used only by kind 'sinkhorn', but the router kind is '{self.kind}'")
        if self.bias_update_rate is not None and self.kind != "sigmoid_bias":
            raise field_error("bias_update_rate", f"is used only by kind 'sigmoid_bias', but the router kind is '{self.kind}'")
        if self.table is not None and self.kind != "token_id":
            raise field_error("table", f"is used only by kind 'token_id', but the router kind is '{self.kind}'")
        for name in ("groups", "top_groups"):  # 1 limits nothing (a resolved spec says so for every kind)
            if (getattr(self, name) or 1) > 1 and not ROUTERS[self.kind].group_limited:
                raise field_error(name, f"is used only by kinds {_GROUP_LIMITED} (group-limited top-k), but the router kind is '{self.kind}'")
        if self.groups > 1 and self.top_groups is None:
            raise field_error("groups", f"splits the experts into {self.groups} groups: set top_groups (how many of them a token may use)")
        if self.top_groups is not None and self.top_groups > self.groups:
            raise field_error("top_groups", f"must be <= groups ({self.groups}), got {self.top_groups}")
        if self.kind == "token_id":
            for name, inert in _LEARNED_ROUTER_OPTIONS.items():
                if name in self.model_fields_set and getattr(self, name) != inert:
                    raise field_error(name, "does not apply to kind 'token_id' (a fixed table, no learned router); remove it")
        return self

    @property
    def expert_choice(self) -> bool:
        """Each expert picks its best tokens of the batch, so a token's output depends on other tokens."""
        return self.kind == "expert_choice"


class Capacity(Base):
    """Per-expert capacity. ``dropless`` sends every token to its experts."""

    mode: Literal["dropless", "capacity"] = "dropless"
    factor: annealable(PosFloat) | None = Field(None, description="Only with mode: capacity. C = floor(factor * tokens * top_k / experts); "
                                            "or annealed {start, end, steps, kind}. Default 1.25 unless capacity.tokens is set.")
    drop_policy: Literal["zero", "renormalize"] | None = Field(
        None, description="Only with mode: capacity. zero: a dropped choice adds nothing; renormalize: kept weights are rescaled to sum to 1."
    )
    tokens: PosInt | None = Field(None, description="Only with mode: capacity, instead of factor: C = tokens slots per expert "
                                  "whatever the batch (the complexity library's expert_capacity).")
    fallback: Literal["none", "dense"] = Field(
        "none", description="dense: a token every expert dropped goes through a dense FFN of one expert's shape (its own weights, "
        "parameters fallback.*), scaled by fallback_weight (the m library's fallback_policy). Only with mode: capacity.")
    fallback_weight: PosFloat | None = Field(None, description="Only with fallback: dense (default 1.0).")

    @model_validator(mode="after")
    def _options_match_mode(self) -> "Capacity":
        if isinstance(self.factor, Anneal):
            self.factor.positive("factor")
        if self.factor is not None and self.tokens is not None:
            raise field_error("tokens", "is an alternative to factor (an absolute capacity per expert); set one of them, not both")
        for name in ("factor", "tokens", "drop_policy"):
            if getattr(self, name) is not None and self.mode != "capacity":
                raise field_error(name, f"is used only with mode 'capacity', but mode is '{self.mode}'")
        if self.fallback != "none" and self.mode != "capacity":
            raise field_error("fallback", f"serves the tokens capacity dropped, but mode is '{self.mode}' (nothing is dropped)")
        if self.fallback_weight is not None and self.fallback != "dense":
            raise field_error("fallback_weight", f"is used only with fallback 'dense', but fallback is '{self.fallback}'")
        return self


class AuxLoss(Base):
    """Weights of the router's auxiliary losses (0 disables one)."""

    load_balance: NonNegFloat = 0.01
    load_balance_scope: Literal["layer", "sequence", "model"] = Field(
        "layer", description="layer: one load-balance loss per MoE layer, summed (Megatron, torchtitan); sequence: per layer, "
        "the balance term of each sequence's tokens, averaged over the sequences (DeepSeek-V3's complementary sequence-wise "
        "loss); model: expert counts and router probabilities pooled over all MoE layers, one product (HF transformers' "
        "load_balancing_loss_func)."
    )
    load_balance_batch: Literal["local", "global"] = Field(
        "local", description="The tokens whose expert counts enter the load-balance loss. local: this rank's micro-batch "
        "(Megatron's and torchtitan's default); global: the counts summed over every data-parallel rank first (Megatron's "
        "global_aux_loss, Qwen's global-batch balance), so a run on N processes computes the single-process loss."
    )
    z_loss: NonNegFloat = 0.0
    entropy: NonNegFloat = Field(0.0, description="Entropy reward: adds -entropy * mean over tokens of H(p), p the per-token normalised router scores.")
    margin: NonNegFloat = Field(0.0, description="Margin reward: adds -margin * mean over tokens of (p_top1 - p_top2), p as for entropy.")

    @model_validator(mode="after")
    def _batch_needs_a_loss(self) -> "AuxLoss":
        if self.load_balance_batch != "local" and self.load_balance == 0:
            raise field_error("load_balance_batch", "chooses the tokens of the load-balance loss, but load_balance is 0 (no loss)")
        if self.load_balance_scope == "sequence" and self.load_balance == 0:
            raise field_error("load_balance_scope", "'sequence' balances each sequence's tokens, but load_balance is 0 (no loss)")
        if self.load_balance_scope == "sequence" and self.load_balance_batch != "local":
            raise field_error("load_balance_batch", "'global' sums the expert counts over the data-parallel ranks, but "
                              "load_balance_scope 'sequence' counts each sequence's own tokens; use one of them")
        return self


class ExpertFfn(Base):
    """One expert: a feed-forward network; all experts share the shape."""

    hidden: Dim | None = Field(None, description=DEFAULT_HIDDEN + " Spectral experts use 2 * d_model as their width.")
    activation: Activation = "swiglu"
    bias: bool = Field(False, description="Biases on every projection (up, gate when gated, down).")
    swiglu_limit: PosFloat | None = Field(None, description="Only with clamped_swiglu: gate <= limit, -limit <= up <= limit (default 7).")
    swiglu_alpha: PosFloat | None = Field(None, description="Only with clamped_swiglu: gate * sigmoid(alpha * gate) (default 1.702).")
    init: Literal["normal", "xavier_uniform", "xavier_normal", "scaled_xavier", "scaled_kaiming"] = Field(
        "normal", description="The routed experts' weights: normal (model.init), xavier_uniform / xavier_normal (Glorot, per expert "
        "matrix), scaled_xavier: normal(0.02 / sqrt(2 * layers)), scaled_kaiming: normal(sqrt(2 / fan_in) / sqrt(2 * layers)).")
    dropout: Prob = Field(0.0, description="Not implemented yet: only 0 is accepted (as for attention and mlp dropout).")

    @model_validator(mode="after")
    def _clamp_options(self) -> "ExpertFfn":
        no_dropout(self.dropout)
        for name in ("swiglu_limit", "swiglu_alpha"):
            if getattr(self, name) is not None and self.activation != "clamped_swiglu":
                raise field_error(name, f"is used only by activation 'clamped_swiglu', but the activation is '{self.activation}'")
        return self


class SharedExperts(Base):
    """Experts every token passes through, added to the routed output."""

    count: PosInt
    hidden: Dim | None = Field(None, description="Default: the routed experts' hidden size.")
    gate: bool = Field(False, description="Scale the shared output by sigmoid(x @ w^T), w of shape [1, width] (Qwen2-MoE).")


class MoeConfig(Base):
    """Router, experts, capacity and auxiliary losses of one MoE layer.

    With ``router.kind: expert_choice`` each expert takes its C best tokens of the batch
    (capacity mode, factor 1.0 by default, so C = tokens * top_k / experts: top_k experts per
    token on average), weights are the softmax scores (no renormalisation) and the load is
    balanced by construction (load_balance 0).
    """

    experts: PosInt
    top_k: PosInt
    expert: ExpertFfn = Field(default_factory=ExpertFfn)
    router: Router = Field(default_factory=Router)
    capacity: Capacity = Field(default_factory=Capacity)
    shared_experts: SharedExperts | None = None
    aux: AuxLoss = Field(default_factory=AuxLoss)

    @model_validator(mode="after")
    def _k_fits(self) -> "MoeConfig":
        if self.top_k > self.experts:
            raise field_error("top_k", f"must be <= experts ({self.experts}), got {self.top_k}")
        return self

    @model_validator(mode="after")
    def _router_options_fit(self) -> "MoeConfig":
        router = self.router
        if router.dropout > 0 and (self.top_k < 2 or router.expert_choice):
            raise field_error("router.dropout", "moves a token to its second-best expert: it needs top_k >= 2 and a token-choice "
                              f"router, got top_k {self.top_k} with kind '{router.kind}'")
        topk = router.sinkhorn.topk if router.sinkhorn is not None else None
        if topk is not None and not self.top_k <= topk <= self.experts:
            raise field_error("router.sinkhorn.topk", f"must be between top_k ({self.top_k}) and experts ({self.experts}), got {topk}")
        if self.aux.margin > 0 and self.experts < 2:
            raise field_error("aux.margin", "needs at least 2 experts (top-1 minus top-2)")
        self._groups_fit()
        if router.scale != 1.0 and self.capacity.drop_policy == "renormalize":
            raise field_error("router.scale", "would be undone by capacity.drop_policy 'renormalize' (the kept weights rescaled "
                              "to sum to 1); use drop_policy 'zero' or scale 1")
        return self

    def _groups_fit(self) -> None:
        """Group-limited routing: equal groups of at least 2 experts (a group scores by its top 2), enough experts to choose from."""
        groups, top_groups = self.router.groups, self.router.top_groups
        if groups == 1:
            return
        if self.experts % groups:
            raise field_error("router.groups", f"must divide experts ({self.experts}), got {groups}")
        size = self.experts // groups
        if size < 2:
            raise field_error("router.groups", f"leaves {size} expert per group; a group's score is the sum of its best 2 scores, "
                              f"so groups must be <= experts / 2 ({self.experts // 2})")
        if self.top_k > top_groups * size:
            raise field_error("top_k", f"must be <= top_groups * experts / groups ({top_groups} * {size} = {top_groups * size}): "
                              f"a token chooses only among the experts of its top_groups best groups, got {self.top_k}")

    @model_validator(mode="after")
    def _token_id_options(self) -> "MoeConfig":
        """Token-id routing: one fixed expert per token, nothing learned to balance or regularise."""
        if self.router.kind != "token_id":
            return self
        if self.top_k != 1:
            raise field_error("top_k", f"must be 1 with router kind 'token_id' (one expert per token id), got {self.top_k}")
        for name in ("load_balance", "z_loss", "entropy", "margin"):
            if name in self.aux.model_fields_set and getattr(self.aux, name) > 0:
                raise field_error(f"aux.{name}", "has no learned router to act on with kind 'token_id'; set it to 0 or remove it")
        if self.aux.load_balance_scope == "sequence":
            raise field_error("aux.load_balance_scope", "'sequence' shapes a load-balance loss, which kind 'token_id' does not have "
                              "(a fixed table); remove it")
        for i, expert in enumerate(self.router.table or ()):
            if expert >= self.experts:
                raise field_error(f"router.table.{i}", f"must be an expert index < experts ({self.experts}), got {expert}")
        return self

    @model_validator(mode="after")
    def _expert_choice_options(self) -> "MoeConfig":
        """Expert choice: capacity-based by definition; no renormalisation; balanced without a loss."""
        if not self.router.expert_choice:
            return self
        if "capacity" in self.model_fields_set and self.capacity.mode != "capacity":
            raise field_error("capacity.mode", "expert_choice routing gives each expert C = floor(factor * tokens * top_k / "
                              "experts) tokens: use mode 'capacity' (or leave capacity out for factor 1.0)")
        if "normalize" in self.router.model_fields_set and self.router.normalize:
            raise field_error("router.normalize", "does not apply to expert_choice: a token's weights are the scores of "
                              "the experts that chose it; remove it")
        if "load_balance" in self.aux.model_fields_set and self.aux.load_balance > 0:
            raise field_error("aux.load_balance", "is constant under expert_choice (every expert takes the same number "
                              "of tokens); set it to 0 or remove it")
        if self.aux.load_balance_batch != "local":
            raise field_error("aux.load_balance_batch", "does not apply to expert_choice: it has no load-balance loss; remove it")
        if self.aux.load_balance_scope == "sequence":
            raise field_error("aux.load_balance_scope", "'sequence' does not apply to expert_choice: it has no load-balance loss; "
                              "remove it")
        return self


class Moe(MoeConfig):
    """A token-routed mixture-of-experts feed-forward layer."""

    kind: Literal["moe"]
    name: LayerName | None = None


def resolve_moe(layer: dict, d_model: int) -> None:
    resolve_moe_config(layer, d_model)


def resolve_moe_config(moe: dict, width: int) -> None:
    """Fill the derived defaults of a dumped ``MoeConfig`` whose experts see ``width`` channels."""
    expert = moe["expert"]
    expert["hidden"] = expert["hidden"] or default_hidden(width, expert["activation"])
    if expert["activation"] == "clamped_swiglu":  # GPT-OSS's values
        expert["swiglu_limit"] = expert["swiglu_limit"] or 7.0
        expert["swiglu_alpha"] = expert["swiglu_alpha"] or 1.702
    router = moe["router"]
    if router["kind"] == "sinkhorn" and router["sinkhorn"] is None:
        router["sinkhorn"] = {"iters": 5, "tau": 0.7}
    if router["kind"] == "sigmoid_bias" and router["bias_update_rate"] is None:
        router["bias_update_rate"] = 1e-3
    router["top_groups"] = router["top_groups"] or router["groups"]
    capacity = moe["capacity"]
    if router["kind"] == "expert_choice":  # see MoeConfig: capacity-based, balanced by construction
        capacity["mode"] = "capacity"
        capacity["factor"] = capacity["factor"] or (1.0 if capacity["tokens"] is None else None)
        router["normalize"] = False
        moe["aux"]["load_balance"] = 0.0
    if router["kind"] == "token_id":  # see MoeConfig: a fixed expert per token id, weight 1, nothing to balance
        router["normalize"] = False
        moe["aux"]["load_balance"] = 0.0
    if capacity["mode"] == "capacity":
        capacity["factor"] = capacity["factor"] or (1.25 if capacity["tokens"] is None else None)
        capacity["drop_policy"] = capacity["drop_policy"] or "zero"
    shared = moe["shared_experts"]
    if shared is not None and shared["hidden"] is None:
        shared["hidden"] = expert["hidden"]
