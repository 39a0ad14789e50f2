"""Lowering of a ``dynamics`` layer: ``x, v = dynamics(x, v)``, outside its block's norm and residual."""

from __future__ import annotations

import math

from moec.ir.graph import Ref
from moec.layers.kind import Lowering
from moec.passes.builder import init_std

CONTROLLER_OUT_STD = 0.01  # the dynamics controller's output weights start small (complexity-deep's normal(0, 0.01))


def lower_dynamics(cx: Lowering, layer, prefix: str, path: tuple, x: Ref) -> Ref:
    """mu, a controller MLP [2D -> C -> 3D] whose output bias starts alpha, beta, gate near their inits; the new
    velocity replaces ``cx.velocity`` for the next dynamics layer (the first starts from v = 0)."""
    b, spec = cx.b, cx.spec
    d, hidden = spec.model.d_model, layer.controller_hidden
    mu = b.param(f"{prefix}.mu", (d,), path, init="zeros", group="bias")  # the learned equilibrium: no weight decay
    w_in = b.param(f"{prefix}.controller_in.weight", (hidden, 2 * d), path, std=init_std(spec))
    b_in = b.param(f"{prefix}.controller_in.bias", (hidden,), path, init="zeros", group="bias")
    w_out = b.param(f"{prefix}.controller_out.weight", (3 * d, hidden), path, std=CONTROLLER_OUT_STD)
    bias = (math.log(layer.init_alpha / (1 - layer.init_alpha)), math.log(math.expm1(layer.init_beta)),
            math.log(layer.init_gate / (1 - layer.init_gate)))  # logit, softplus^-1, logit
    b_out = b.param(f"{prefix}.controller_out.bias", (3 * d,), path, init="chunks", values=bias, group="bias")
    x, v = b.add("dynamics", [x, *cx.velocity[-1:], mu, w_in, b_in, w_out, b_out], path, outputs=2, dt=layer.dt,
                 beta_max=layer.beta_max, velocity_limit=layer.velocity_limit)
    cx.velocity[:] = [v]
    return x
