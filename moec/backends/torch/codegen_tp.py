"""The tensor-parallel forms of a generated ``model.py``.

Only a program whose spec splits something over a tensor-parallel axis larger than 1 gets them;
any other program is written exactly as before. parallel.py splits the attention and MLP
projections, the vocabulary and the norms with torch's plans (``parallelize_module``), so their
calls (``self.wq(x)``, ``self.embed(tokens)``) read the same as on one process. What model.py
writes differently (helpers from ``moec.backends.torch.tp_support``, copied into model_support.py):

- RoPE and attention take their head counts from the local projections' widths
  (``q.shape[-1] // head_dim``), so the same file runs whole on one process; so do MLA's per-head splits
  and its attention;
- MLA's rope key, computed whole on every rank from the whole latent projection and shared by the heads,
  enters the rank's heads through Megatron's f (``copy_to_shards`` with the head-split ``wkv_b``): the
  gradient of its heads, summed over tp, reaches wkv_a and the layer's input (the q and kv latents get it
  from ColwiseParallel on wq_b and wkv_b);
- the fused MoE function reads the experts' local hidden slices (``local``), with Megatron's f
  (``copy_to_shards``) on its routed rows and g (``sum_over_shards``) on the experts' outputs, before
  the router's weights combine them (``codegen_moe``);
- a head tied to a vocabulary-split embedding reads the table's local rows after f; its logits stay
  split along the vocabulary (the trainer's loss reduces over tp).
"""

from __future__ import annotations

from dataclasses import replace

from moec.ir.graph import Node

def local(arg: str) -> str:
    return f"local({arg})"


def tied_head(args: list[str]) -> list[str]:
    """The arguments of a linear that reads a vocabulary-split table it does not own (a tied head)."""
    return [f"copy_to_shards({args[0]}, {args[1]})", local(args[1]), *args[2:]]


def local_heads(node: Node, args: list[str], per_head: int) -> Node:
    """``node`` with its head counts read off the (local) projections: ``q.shape[-1] // head_dim``. ``per_head``:
    the width of one head of its first input (a split's: the sum of its parts). A one-head tensor (MLA's rope key,
    a kv head whole on every rank) is not split: it keeps its count."""
    if node.attr["heads"] == 1:
        return node
    counts = {"heads": f"{args[0]}.shape[-1] // {per_head}"}
    if node.op == "attention":
        counts["kv_heads"] = f"{args[1]}.shape[-1] // {node.attr['head_dim']}"
    attrs = tuple((key, counts.get(key, value)) for key, value in node.attrs)
    return replace(node, attrs=attrs)


def shared_rope_key(k_pe: str, wkv_b: str) -> str:
    """The statement before an MLA attention whose heads are split: the whole rope key through Megatron's f."""
    return f"{k_pe} = copy_to_shards({k_pe}, {wkv_b})  # whole on every rank, read by this rank's heads"
