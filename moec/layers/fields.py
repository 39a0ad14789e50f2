"""Spec fields every layer kind shares: its ``name``, the expert / FFN activations, the dropout refusal."""

from __future__ import annotations

import keyword
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from moec.schema.base import field_error

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

# The names of moec.moe.ACTIVATIONS (tests keep them equal); the registry says what each one
# computes. Gated activations have a second input projection.
Activation = Literal["gelu", "relu", "silu", "swiglu", "geglu", "reglu", "clamped_swiglu"]
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu", "clamped_swiglu")
DEFAULT_HIDDEN = "Default: 4 * width, or 8/3 * width rounded up to a multiple of 8 for gated activations."


def no_dropout(dropout: float) -> None:
    """Dropout is accepted by the schema but no backend applies it yet: refuse it rather than ignore it."""
    if dropout > 0:
        raise field_error("dropout", f"is not implemented yet (the model would train without it); remove it, got {dropout}")


def default_hidden(width: int, activation: str) -> int:
    """An FFN's hidden size when the spec leaves it null (``DEFAULT_HIDDEN``)."""
    # Gated FFNs keep the parameter count of a 4x FFN: 2/3 * 4 * width, rounded up to 8.
    if activation in GATED_ACTIVATIONS:
        return -(-(8 * width // 3) // 8) * 8
    return 4 * width
