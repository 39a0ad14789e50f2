"""The tensor-parallel statements of a generated ``model.py`` (``moec.backends.torch.tensor_parallel``).

Only a program whose spec splits something over a tensor-parallel axis larger than 1 gets them;
any other program is written exactly as before. ``splits`` maps each split parameter to
``"column"`` (output features) or ``"row"`` (input features), from the graph's placements
(``moec.passes.sharding``). In such a program:

- a column-split linear reads ``tensor_parallel.local(weight)``, and its input enters through
  ``tensor_parallel.copy`` once (one ``x_tp = tensor_parallel.copy(x)`` statement shared by
  q, k and v, or by up and gate);
- a k / v projection of an attention layer with fewer KV heads than ranks (``replicated``: name ->
  kv_heads, ``moec.passes.sharding.replicated_kv``) stays whole and is read through
  ``tensor_parallel.kv_shard(weight, kv_heads)``, its input through the same *f* as q's (with
  ``partial=True`` under sequence parallelism, whose ``reduce_gradients`` sums whole weights);
- a row-split linear is wrapped in ``tensor_parallel.reduce``;
- RoPE and attention take their head counts from the local projections' widths
  (``q.shape[-1] // head_dim``), so the same file runs whole on one process;
- the fused MoE function reads the experts' local hidden slices, with *f* on its routed rows and
  *g* on the experts' outputs, before the router's weights combine them (``codegen_moe``).

With ``embed`` and ``head`` split (the vocabulary), the embedding is ``tensor_parallel.embedding`` on
the local rows of the table and the head a column-split linear whose logits stay split: the trainer's
loss reduces over tp (``tensor_parallel.cross_entropy``).

With ``sequence_parallel`` the blocks' hidden state is split along the sequence (the root splits
the first block's input and gathers the last block's output), *f* is an all-gather along the
sequence and *g* a reduce-scatter (Megatron-SP); validation admits it for attention and MLP layers.
"""

from __future__ import annotations

from dataclasses import replace

from moec.ir.graph import Node

MODULE = "tensor_parallel"
IMPORT = "from moec.backends.torch import tensor_parallel"


def local(arg: str) -> str:
    return f"{MODULE}.local({arg})"


def kv_shard(arg: str, kv_heads: int, sequence_parallel: bool = False) -> str:
    """Under sequence parallelism the gradient stays partial: ``reduce_gradients`` sums the blocks' whole weights."""
    return f"{MODULE}.kv_shard({arg}, {kv_heads}{', partial=True' if sequence_parallel else ''})"


def copied(name: str) -> str:
    """The name of ``name`` after Megatron's f."""
    return f"{name}_tp"


def copy_statement(name: str, sequence_parallel: bool = False) -> str:
    if sequence_parallel:
        return f"        {copied(name)} = {MODULE}.gather_sequence({name})  # f: all-gather the sequence (reduce-scatter backward)"
    return f"        {copied(name)} = {MODULE}.copy({name})  # f: identity forward, gradient summed over the tensor-parallel ranks"


def reduced(expr: str, sequence_parallel: bool = False) -> str:
    return f"{MODULE}.{'scatter_sequence' if sequence_parallel else 'reduce'}({expr})"


def split_statement(name: str) -> str:
    return (f"        {name} = {MODULE}.split_sequence({name})  # sequence parallel: this rank's S / tp positions "
            "through the blocks")


def gather_statement(name: str) -> str:
    return f"        {name} = {MODULE}.unsplit_sequence({name})  # sequence parallel: the whole sequence after the blocks"


def embedding(args: list[str], padding_idx: int | None) -> str:
    """A lookup in the vocabulary-split table ``args[1]`` (already ``local``), summed over the ranks."""
    pad = "" if padding_idx is None else f", padding_idx={padding_idx!r}"
    return f"{MODULE}.embedding({args[0]}, {args[1]}{pad})"


def local_heads(node: Node, args: list[str]) -> Node:
    """``node`` with its head counts read off the (local) projections: ``q.shape[-1] // head_dim``."""
    head_dim = node.attr["head_dim"]
    counts = {"heads": f"{args[0]}.shape[-1] // {head_dim}"}
    if node.op == "attention":
        counts["kv_heads"] = f"{args[1]}.shape[-1] // {head_dim}"
    attrs = tuple((key, counts.get(key, value)) for key, value in node.attrs)
    return replace(node, attrs=attrs)
