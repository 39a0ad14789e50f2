"""The Hugging Face families moec imports and exports: one adapter per family, one registry.

Adding a family is one file here (a ``Family`` subclass, see ``base.py``), one line in
``FAMILIES`` and tests (``tests/interop/test_hf_families.py``). The order is that of the
message listing the architectures moec imports.
"""

from moec.interop.families import deepseek_v3, glm4_moe, gpt_oss, llama, mixtral, olmoe, qwen2, qwen2_moe, qwen3_moe
from moec.interop.families.base import Family

FAMILIES: dict[str, Family] = {family.name: family for family in (
    mixtral.FAMILY,
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    olmoe.FAMILY,
    llama.FAMILY,
    qwen2.FAMILY,
    gpt_oss.FAMILY,
    deepseek_v3.FAMILY,
    glm4_moe.FAMILY,
)}
BY_ARCHITECTURE = {family.architecture: family for family in FAMILIES.values()}

__all__ = ["BY_ARCHITECTURE", "FAMILIES", "Family"]
