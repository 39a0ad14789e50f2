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
        for hf, ours in ATTENTION.items() if family.attention_kind == "attention" else ():  # MLA: its own table
            assert names[f"self_attn.{hf}"] == f"attention.{ours}"
        if not has_moe:
            for hf, ours in SWIGLU.items():
                assert names[f"mlp.{hf}"] == f"mlp.{ours}"


def exported_as(config, change) -> str:
    """hf_config of the spec imported from ``config`` after ``change(model)``: the family, or the refusal."""
    import yaml

    import moec
    from moec.interop.hf_export import NotExportable, hf_config
    from moec.interop.hf_import import render_spec, spec_from_config

    spec, _ = spec_from_config(config.to_dict() | {"architectures": config.architectures}, "x", "test")
    change(spec["model"])
    try:
        return hf_config(moec.load_spec_text(render_spec(spec, None), file="x.yaml"))[1].name
    except NotExportable as err:
        return str(err)


def gpt_oss_config():
    import transformers as T

    config = T.GptOssConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, vocab_size=96, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)
    config.architectures = ["GptOssForCausalLM"]
    return config


def test_a_gpt_oss_spec_with_a_dense_layer_is_refused():
    """GPT-OSS configs have no dense layers: HF would build an MoE layer in its place."""
    def densify(model):
        model["blocks"][0]["layers"][1] = {"kind": "mlp", "hidden": 40, "activation": "swiglu"}

    assert exported_as(gpt_oss_config(), lambda model: None) == "gpt_oss"
    assert exported_as(gpt_oss_config(), densify) == (
        "model.blocks[0].layers[1]: dense layers must be bias-free SwiGLU and exist only in Llama / Qwen families "
        "(exporting as GptOssForCausalLM)")


def test_q_k_norm_is_refused_by_families_without_it():
    """A Llama (or GPT-OSS) config has no q/k norm: its weights would be dropped by HF's loader."""
    import transformers as T

    llama = T.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                          max_position_embeddings=64)
    llama.architectures = ["LlamaForCausalLM"]

    def qk_norm(model):
        for block in model["blocks"]:
            block["layers"][0]["qk_norm"] = {"scope": "head"}

    why = "q/k norm exists only in Qwen3-MoE and GLM-4.5-MoE (scope: head) and OLMoE (scope: projection)"
    assert exported_as(llama, qk_norm) == f"model.blocks[0].layers[0].qk_norm: {why} (exporting as LlamaForCausalLM)"
    assert exported_as(gpt_oss_config(), qk_norm) == f"model.blocks[0].layers[0].qk_norm: {why} (exporting as GptOssForCausalLM)"
