"""Lowering of a ``moe`` layer: parameters from the spec, then the shared decomposition.

The primitive ops an MoE becomes are written once, in ``moec.moe.decompose`` (which ``fuse_moe``
and the reference interpreter use too); this module only creates the parameters and calls it.
"""

from __future__ import annotations

from moec.ir.graph import Ref
from moec.layers.kind import Lowering
from moec.moe import decompose, moe_attrs, moe_params
from moec.moe.routers import ROUTERS


def lower_moe(cx: Lowering, layer, prefix: str, path: tuple, h: Ref) -> Ref:
    """A token-routed MoE layer on ``h`` [.., d_model]: its weighted aux loss joins the model's, its balance
    statistics (aux.load_balance_scope: model) the pooled load-balance loss."""
    b, spec = cx.b, cx.spec
    attrs, width = moe_attrs(layer), spec.model.d_model
    shared = layer.shared_experts
    decls = moe_params(attrs, width, width, layer.expert.hidden, shared.count * shared.hidden if shared else 0)
    params = b.declare(spec, prefix, path, decls)
    router_in = h if ROUTERS[attrs.router.kind].learned else b.input_ref("tokens")  # token_id routes by the input ids
    out, aux, *stats = decompose(b, attrs, h, router_in, params, path)
    cx.balance += [(ref, path, layer) for ref in stats]
    cx.aux_terms.append(aux)
    return out
