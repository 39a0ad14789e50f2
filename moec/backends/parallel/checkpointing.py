"""Activation checkpointing (``schedule.activation_checkpointing``) in the generated ``parallel.py``.

``full`` recomputes every checkpointed block's forward in the backward pass and keeps only its
inputs; ``selective`` keeps the outputs of the matmuls (and attention) and recomputes the cheap
ops around them: norms, RoPE, activations, routing (torchtitan's op-level policy, through
``torch.utils.checkpoint.create_selective_checkpoint_contexts``). Both are torch's non-reentrant
checkpoint. Block ``i`` is checkpointed when ``(i + 1) % every == 0`` (torchtitan's ``ac_freq``).

The block's ``forward`` is wrapped in place rather than the block replaced by
``checkpoint_wrapper``: that wrapper puts ``_checkpoint_wrapped_module`` into every parameter and
buffer name, and moec addresses parameters and buffers by their spec names (optimizer groups,
router selection biases, annealed buffers, checkpoints). The call is the one ``checkpoint_wrapper``
makes: ``checkpoint(forward, *args, use_reentrant=False, context_fn=...)``.
"""

from __future__ import annotations

# The ops whose outputs selective checkpointing keeps: matmuls and attention (their recomputation
# costs the most FLOPs). Names are looked up on torch.ops.aten when parallel.py loads; one this
# torch build lacks is skipped.
SAVED_OPS = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")


def checkpointed_blocks(every: int, blocks: int) -> tuple[int, ...]:
    """The indices of the blocks ``every`` checkpoints."""
    return tuple(i for i in range(blocks) if (i + 1) % every == 0)


def stdlib_imports(mode: str) -> list[str]:
    return [] if mode == "none" else ["from functools import partial", ""]


def torch_imports(mode: str) -> list[str]:
    if mode == "none":
        return []
    if mode == "selective":
        return ["from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts"]
    return ["from torch.utils.checkpoint import checkpoint"]


def checkpointing_source(ac, blocks: int, where) -> list[str]:
    """``checkpoint_activations(model)``, preceded by the selective policy when the spec asks for it."""
    header = ["def checkpoint_activations(model: torch.nn.Module) -> None:"]
    if ac.mode == "none":
        return header + [f'    """Nothing to do: activation checkpointing is off."""  {where("schedule", "activation_checkpointing")}']
    chosen = checkpointed_blocks(ac.every, blocks)
    lines = _policy_source() if ac.mode == "selective" else []
    context = ", context_fn=partial(create_selective_checkpoint_contexts, save_matmuls)" if ac.mode == "selective" else ""
    keeps = "matmul and attention outputs" if ac.mode == "selective" else "only their inputs"
    return lines + header + [
        f'    """{ac.mode.capitalize()} activation checkpointing: the backward pass recomputes these blocks\' forward',
        f'    (torch\'s non-reentrant checkpoint), keeping {keeps}."""',
        f"    for index in {_indices(chosen)}:  # {_every(ac.every)}  {where('schedule', 'activation_checkpointing')}",
        "        block = model.blocks[index]",
        f"        block.forward = partial(checkpoint, block.forward, use_reentrant=False{context})",
    ]


def _policy_source() -> list[str]:
    return [
        f"SAVED_OPS = {{getattr(torch.ops.aten, name).default for name in {SAVED_OPS!r} if hasattr(torch.ops.aten, name)}}",
        "",
        "",
        "def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:",
        '    """Selective checkpointing\'s policy: keep what the matmuls and attention computed, recompute the rest."""',
        "    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE",
        "",
        "",
    ]


def _indices(chosen: tuple[int, ...]) -> str:
    """``range(1, 96, 2)`` for evenly spaced block indices, else the tuple."""
    if len(chosen) > 2:
        step = chosen[1] - chosen[0]
        if step > 0 and all(b - a == step for a, b in zip(chosen, chosen[1:])):
            return f"range({chosen[0]}, {chosen[-1] + 1}{f', {step}' if step > 1 else ''})"
    return repr(chosen)


def _every(n: int) -> str:
    if n == 1:
        return "every block"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"every {n}{suffix} block"
