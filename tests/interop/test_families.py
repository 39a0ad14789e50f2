"""The family registry: every adapter file is registered, exactly one family exports a spec, and
each family's names map one-to-one (export can invert import)."""

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

from moec.interop.families import BY_ARCHITECTURE, FAMILIES
from moec.interop.families.base import ATTENTION, SWIGLU

FOLDER = Path(__file__).resolve().parents[2] / "moec" / "interop" / "families"
SHARED = {"__init__", "base", "experts"}  # the registry and what the families share


def test_every_family_file_is_registered_under_its_model_type():
    files = {p.stem for p in FOLDER.glob("*.py")} - SHARED
    assert files == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.name == name and type(family).__module__ == f"moec.interop.families.{name}"
    assert len(BY_ARCHITECTURE) == len(FAMILIES)


def spec_shapes():
    """Every combination of the fields that tell the families apart."""
    for sinks, bias, qk_norm, ffn in itertools.product((False, True), (False, True, "qkv"), (None, "head", "projection"),
                                                       ("dense", "moe", "moe+shared")):
        attention = SimpleNamespace(sinks=sinks, bias=bias, qk_norm=qk_norm and SimpleNamespace(scope=qk_norm))
        moe = None if ffn == "dense" else SimpleNamespace(shared_experts=object() if ffn == "moe+shared" else None)
        yield attention, moe


@pytest.mark.parametrize("attention, moe", list(spec_shapes()))
def test_exactly_one_family_claims_each_spec(attention, moe):
    claimed = [name for name, family in FAMILIES.items() if family.claims(attention, moe)]
    assert len(claimed) == 1, claimed


@pytest.mark.parametrize("name", list(FAMILIES))
def test_names_are_one_to_one_and_share_the_llama_table(name):
    family = FAMILIES[name]
    for has_moe in (False, True) if family.moe else (False,):
        names = family.layer_names(has_moe)
        assert len(set(names.values())) == len(names), "two HF names for one moec parameter: export could not choose"
        for hf, ours in ATTENTION.items():
            assert names[f"self_attn.{hf}"] == f"attention.{ours}"
        if not has_moe:
            for hf, ours in SWIGLU.items():
                assert names[f"mlp.{hf}"] == f"mlp.{ours}"
