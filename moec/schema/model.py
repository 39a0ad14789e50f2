"""The ``model`` section: inputs, blocks of layers (attention, MLP, MoE, spectral MoE), head.

Fields left ``null`` are derived when the spec is resolved (``moec validate --resolved``
prints them filled in); their descriptions say from what.
"""

from __future__ import annotations

import keyword
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, model_validator

from moec.schema.base import MAX_DIM, Base, Dim, NonNegFloat, PosFloat, PosInt, Prob, field_error

# Attributes of torch.nn.Module (and `training`): a layer named like one would shadow it.
_MODULE_ATTRIBUTES = frozenset(
    "T_destination add_module apply bfloat16 buffers call_super_init children compile cpu cuda double dump_patches "
    "eval extra_repr float forward get_buffer get_extra_state get_parameter get_submodule half ipu load_state_dict "
    "modules mtia named_buffers named_children named_modules named_parameters parameters register_backward_hook "
    "register_buffer register_forward_hook register_forward_pre_hook register_full_backward_hook "
    "register_full_backward_pre_hook register_load_state_dict_post_hook register_load_state_dict_pre_hook "
    "register_module register_parameter register_state_dict_post_hook register_state_dict_pre_hook requires_grad_ "
    "set_extra_state set_submodule share_memory state_dict to to_empty train type xpu zero_grad training".split()
)


def _check_layer_name(name: str | None) -> str | None:
    """Layer names become parameter-name prefixes and attribute names in generated code."""
    if name is not None and (keyword.iskeyword(name) or name in _MODULE_ATTRIBUTES):
        raise ValueError(f"'{name}' is reserved (a Python keyword or torch.nn.Module attribute); choose another name")
    return name


LayerName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=64, description="Parameter-name prefix; default: the kind."),
    AfterValidator(_check_layer_name),
]

# The names of moec.moe.ACTIVATIONS and ROUTERS (tests keep them equal); the registry says
# what each one computes. Gated activations have a second input projection.
Activation = Literal["gelu", "relu", "silu", "swiglu", "geglu", "reglu", "clamped_swiglu"]
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu", "clamped_swiglu")
RouterKind = Literal["topk", "sinkhorn", "sigmoid_bias", "expert_choice", "token_id"]
DEFAULT_HIDDEN = "Default: 4 * width, or 8/3 * width rounded up to a multiple of 8 for gated activations."


class Norm(Base):
    """A normalisation layer."""

    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-5


class Yarn(Base):
    """YaRN context extension of RoPE (Peng et al. 2023), as HF transformers' ``rope_type: yarn``."""

    kind: Literal["yarn"]
    factor: Annotated[float, Field(gt=1.0, le=1e6)]
    original_max_seq_len: Dim = Field(..., description="The context length the model was pretrained with.")
    beta_fast: PosFloat = 32.0
    beta_slow: PosFloat = 1.0
    truncate: bool = Field(True, description="Round the correction range to whole dimensions.")


class Rope(Base):
    """Rotary position embedding on queries and keys."""

    theta: PosFloat = 10000.0
    scaling: Yarn | None = Field(None, description="null: plain RoPE.")


class QkNorm(Base):
    """RMSNorm of the queries and keys after their projections, before RoPE."""

    kind: Literal["rmsnorm"] = "rmsnorm"
    scope: Literal["head", "projection"] = Field(
        ..., description="head: one [head_dim] weight shared by the heads (Qwen3); projection: over the whole q / k projection (OLMoE)."
    )
    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6


def _no_dropout(dropout: float) -> None:
    """Dropout is accepted by the schema but no backend applies it yet: refuse it rather than ignore it."""
    if dropout > 0:
        raise field_error("dropout", f"is not implemented yet (the model would train without it); remove it, got {dropout}")


class Attention(Base):
    """Multi-head self-attention; ``kv_heads < heads`` is grouped-query attention."""

    kind: Literal["attention"]
    name: LayerName | None = None
    heads: PosInt
    kv_heads: PosInt | None = Field(None, description="Default: heads (plain MHA).")
    head_dim: Dim | None = Field(None, description="Default: d_model // heads.")
    rope: Rope | None = Field(default_factory=Rope, description="null disables RoPE.")
    causal: bool = True
    bias: bool | Literal["qkv"] = Field(False, description="true: biases on q, k, v and the output projection; qkv: on q, k, v only (Qwen2).")
    qk_norm: QkNorm | None = None
    sinks: bool = Field(False, description="A learned logit per head joins each softmax row and takes probability mass (GPT-OSS).")
    window: Dim | None = Field(None, description="Sliding window: a query sees itself and the window - 1 keys before it. null: all.")
    dropout: Prob = Field(0.0, description="Not implemented yet: only 0 is accepted.")

    @model_validator(mode="after")
    def _window_is_causal(self) -> "Attention":
        if self.window is not None and not self.causal:
            raise field_error("window", "a sliding window is implemented for causal attention only")
        _no_dropout(self.dropout)
        return self


class Mlp(Base):
    """A dense feed-forward layer."""

    kind: Literal["mlp"]
    name: LayerName | None = None
    hidden: Dim | None = Field(None, description=DEFAULT_HIDDEN)
    activation: Activation = "gelu"
    bias: bool = False
    dropout: Prob = Field(0.0, description="Not implemented yet: only 0 is accepted.")

    @model_validator(mode="after")
    def _not_clamped(self) -> "Mlp":
        _no_dropout(self.dropout)
        if self.activation == "clamped_swiglu":
            raise field_error("activation", "'clamped_swiglu' is an expert activation (GPT-OSS); use 'swiglu' for a dense layer")
        return self


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
_LEARNED_ROUTER_OPTIONS = {"temperature": 1.0, "noise": Noise(), "normalize": False, "bias": False, "norm": "none", "dropout": 0.0}


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
    load_balance_scope: Literal["layer", "model"] = Field(
        "layer", description="layer: one load-balance loss per MoE layer, summed (Megatron, torchtitan); model: expert counts "
        "and router probabilities pooled over all MoE layers, one product (HF transformers' load_balancing_loss_func)."
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
        _no_dropout(self.dropout)
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
        return self

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
        return self


class Moe(MoeConfig):
    """A token-routed mixture-of-experts feed-forward layer."""

    kind: Literal["moe"]
    name: LayerName | None = None


class SpectralMoe(Base):
    """rfft over the sequence -> (MoE on spectral tokens) x depth, shared weights -> irfft."""

    kind: Literal["spectral_moe"]
    name: LayerName | None = None
    depth: Annotated[int, Field(ge=1, le=64)] = 1
    fft_norm: Literal["ortho", "forward", "backward"] = "ortho"
    band: Literal["embedding", "index_feature", "none"] = Field(
        "embedding", description="What the router sees of a token's frequency band besides its content."
    )
    moe: MoeConfig
    residual: bool = Field(True, description="true: z = z + moe(z) at each step; false: z = moe(z), as the Tessera seed writes "
                           "`z = mixture(z)`.")
    bands: PosInt | None = Field(None, description="Per-band experts: the F rfft bins in this many contiguous groups (bin f in group "
                                 "floor(f * bands / F)), each routed only among its own experts / bands experts (router kind topk; "
                                 "experts divisible by bands, top_k <= experts / bands). null: every bin may use every expert.")

    @model_validator(mode="after")
    def _routes_by_content(self) -> "SpectralMoe":
        if self.moe.router.kind == "token_id":
            raise field_error("moe.router.kind", "'token_id' routes token ids; a spectral token is a frequency bin, not a token")
        if self.bands is not None:
            if self.moe.experts % self.bands:
                raise field_error("bands", f"must divide moe.experts ({self.moe.experts}), got {self.bands}")
            if self.moe.top_k > self.moe.experts // self.bands:
                raise field_error("bands", f"leaves {self.moe.experts // self.bands} experts per band, fewer than top_k ({self.moe.top_k})")
            if self.moe.router.kind != "topk":
                raise field_error("bands", f"restricts a softmax top-k router; router kind '{self.moe.router.kind}' is not supported with it")
        return self


OpenUnit = Annotated[float, Field(gt=0.0, lt=1.0)]


class Dynamics(Base):
    """INL dynamics (the complexity seed's ``h, velocity = dynamics(h, velocity)``): a velocity state carried
    through the blocks. It updates the residual stream itself, so the block's norm and residual do not wrap it.

    A controller MLP on [h, v] gives alpha = sigmoid, beta = min(softplus, beta_max), gate = sigmoid;
    v' = clamp(alpha * v - beta * (h - mu), -velocity_limit, velocity_limit); h' = h + dt * gate * v'.
    The first dynamics layer starts from v = 0. docs/semantics.md defines it.
    """

    kind: Literal["dynamics"]
    name: LayerName | None = None
    controller_hidden: Dim = Field(64, description="Width of the controller MLP (silu) on [h, v].")
    dt: PosFloat = Field(0.1, description="Step of the position update h + dt * gate * v'.")
    beta_max: PosFloat = Field(2.0, description="beta = min(softplus(.), beta_max).")
    velocity_limit: PosFloat = Field(10.0, description="v' is clamped to [-velocity_limit, velocity_limit].")
    init_alpha: OpenUnit = Field(0.9, description="Initial alpha: the controller's output bias starts at logit(init_alpha).")
    init_beta: PosFloat = Field(0.1, description="Initial beta: the bias starts at softplus^-1(init_beta).")
    init_gate: OpenUnit = Field(0.5, description="Initial gate: the bias starts at logit(init_gate).")

    @model_validator(mode="after")
    def _beta_fits(self) -> "Dynamics":
        if self.init_beta >= self.beta_max:
            raise field_error("init_beta", f"must be below beta_max ({self.beta_max}), got {self.init_beta}")
        return self


Layer = Annotated[Union[Attention, Mlp, Moe, SpectralMoe, Dynamics], Field(discriminator="kind")]


class Block(Base):
    """A residual block: each layer is wrapped as x + layer(norm(x)) (pre_norm) or norm(x + layer(x)); a dynamics layer
    is not wrapped (x, v = dynamics(x, v))."""

    repeat: PosInt = 1
    norm: Norm = Field(default_factory=Norm)
    residual: Literal["pre_norm", "post_norm"] = "pre_norm"
    layers: Annotated[list[Layer], Field(min_length=1, max_length=64)]

    @model_validator(mode="after")
    def _unique_layer_names(self) -> "Block":
        seen: set[str] = set()
        for index, layer in enumerate(self.layers):
            name = layer.name or layer.kind
            if name in seen:
                raise field_error(f"layers.{index}.name", f"two layers in this block are named '{name}'; give one a distinct 'name'")
            seen.add(name)
        return self


class TokenInputs(Base):
    """Integer token ids in [0, vocab)."""

    kind: Literal["tokens"]
    vocab: Dim
    pad_id: Annotated[int, Field(ge=0, le=MAX_DIM)] | None = Field(
        None, description="Padding token: its embedding row gets no gradient (torch's padding_idx)."
    )

    @model_validator(mode="after")
    def _pad_in_vocab(self) -> "TokenInputs":
        if self.pad_id is not None and self.pad_id >= self.vocab:
            raise field_error("pad_id", f"must be < vocab ({self.vocab}), got {self.pad_id}")
        return self


class ContinuousInputs(Base):
    """Real-valued vectors of ``dims`` channels per position."""

    kind: Literal["continuous"]
    dims: Annotated[int, Field(ge=1, le=4096)]


Inputs = Annotated[Union[TokenInputs, ContinuousInputs], Field(discriminator="kind")]


class LmHead(Base):
    """Logits over the vocabulary; trained with cross-entropy on the next token."""

    kind: Literal["lm"]
    tie_embeddings: bool = False
    pool: Literal["none", "last"] = Field("none", description="last: predict only from the final position.")


class RegressionHead(Base):
    """A linear read-out; trained with MSE on the next value."""

    kind: Literal["regression"]
    out_dims: Annotated[int, Field(ge=1, le=4096)] | None = Field(None, description="Default: inputs.dims.")
    pool: Literal["none", "last"] = Field("none", description="last: predict only from the final position.")


Head = Annotated[Union[LmHead, RegressionHead], Field(discriminator="kind")]


class Init(Base):
    """Deterministic initialisation from the train seed."""

    std: PosFloat = 0.02
    scale_by_depth: bool = Field(True, description="Output projections use std / sqrt(2 * layers).")


class Model(Base):
    """The network: inputs -> blocks -> final norm -> head."""

    d_model: Annotated[int, Field(ge=1, le=MAX_DIM)]
    max_seq_len: Dim
    inputs: Inputs
    position: Literal["none", "learned"] = Field("none", description="learned: a position embedding of max_seq_len rows.")
    blocks: Annotated[list[Block], Field(min_length=1, max_length=256)]
    final_norm: Norm | None = Field(default_factory=Norm)
    head: Head
    init: Init = Field(default_factory=Init)

    @model_validator(mode="after")
    def _head_matches_inputs(self) -> "Model":
        if self.head.kind == "lm" and self.inputs.kind != "tokens":
            raise field_error("head.kind", "an 'lm' head needs token inputs; use kind 'regression' for continuous inputs")
        if self.head.kind == "regression" and self.inputs.kind != "continuous":
            raise field_error("head.kind", "a 'regression' head needs continuous inputs; use kind 'lm' for token inputs")
        for b, i, layer in self.layers():
            where = f"blocks.{b}.layers.{i}"
            if layer.kind == "moe" and layer.router.kind == "token_id":
                self._token_ids_fit(layer.router, where)
            if layer.kind != "attention":
                continue
            if layer.head_dim is None and self.d_model % layer.heads:
                raise field_error(f"{where}.heads", f"must divide d_model ({self.d_model}), got {layer.heads}; or set head_dim")
            if layer.kv_heads is not None and layer.heads % layer.kv_heads:
                raise field_error(f"{where}.kv_heads", f"must divide heads ({layer.heads}), got {layer.kv_heads}")
        return self

    def _token_ids_fit(self, router: Router, where: str) -> None:
        if self.inputs.kind != "tokens":
            raise field_error(f"{where}.router.kind", "'token_id' routes by token id and needs token inputs, but inputs are continuous")
        if router.table is not None and len(router.table) > self.inputs.vocab:
            raise field_error(f"{where}.router.table", f"has {len(router.table)} entries, more than the vocabulary ({self.inputs.vocab})")

    def layers(self):
        """``(block_index, layer_index, layer)`` for every layer as written (before ``repeat``)."""
        for b, block in enumerate(self.blocks):
            for i, layer in enumerate(block.layers):
                yield b, i, layer

    @property
    def num_layers(self) -> int:
        """Blocks after ``repeat`` is unrolled."""
        return sum(block.repeat for block in self.blocks)
