"""The parameter naming convention: ``blocks.<i>.<layer>.<...>`` for the i-th block's parameters.

Lowering names every block's parameters so (``moec.passes.lower``); the passes, the emitter and
the Hugging Face mapping read the block index back from a name through here.
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_block_name(name: str) -> tuple[int, str] | None:
    """``blocks.3.moe.router.weight`` -> ``(3, "moe.router.weight")``; None outside every block."""
    found = _BLOCK.match(name)
    return (int(found.group(1)), found.group(2)) if found else None


def block_of(name: str) -> int | None:
    """The block index of a parameter name, or None for the root's parameters (embed, head, ...)."""
    split = split_block_name(name)
    return split[0] if split else None
