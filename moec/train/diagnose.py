"""Finding where a non-finite loss comes from, in terms of the spec."""

from __future__ import annotations

import torch

from moec.backends.reference.interpreter import ReferenceModel, first_nonfinite


def describe_nonfinite(program, model: torch.nn.Module, inputs: torch.Tensor, seed: int) -> str:
    """Name the non-finite parameters and the first non-finite activation, with its spec line.

    The batch is replayed through the reference interpreter of the unfused graph, in fp32,
    with the model's current weights.
    """
    bad_params = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    unfused = next(record.graph for record in program.log if record.name == "infer_shapes")
    reference = ReferenceModel(unfused, seed=seed, device="cpu")
    reference.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    node = first_nonfinite(reference, inputs.cpu())
    parts = []
    if node is not None:
        where = f" from {node.origin}" if node.origin is not None else ""
        parts.append(f"the first non-finite activation is %{node.name} = {node.op}(...){where}")
    else:
        parts.append("the fp32 reference replay of this batch stays finite (the overflow is in reduced precision)")
    if bad_params:
        shown = ", ".join(bad_params[:5]) + (f" and {len(bad_params) - 5} more" if len(bad_params) > 5 else "")
        parts.append(f"non-finite parameters: {shown}")
    return "; ".join(parts)
