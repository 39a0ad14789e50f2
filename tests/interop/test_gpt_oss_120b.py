"""GPT-OSS-120B from transformers' GptOssConfig() defaults: imported, built on the meta device,
the same parameter count as the HF model (also on the meta device). Nothing is allocated."""

import time

import torch
import transformers as T

import moec
from moec.interop import import_hf

SPEC = "specs/gpt_oss_120b_moe.yaml"


def test_gpt_oss_120b_parameter_count_matches_transformers(tmp_path):
    config = T.GptOssConfig()
    config.architectures = ["GptOssForCausalLM"]
    config.save_pretrained(tmp_path)
    result = import_hf(tmp_path, tmp_path / "gpt_oss_120b_moe.yaml")
    assert result.weights is None
    spec = moec.load_spec(result.spec)
    started = time.perf_counter()
    program = moec.compile_spec(spec)
    model = moec.build_model(spec, device="meta")
    assert time.perf_counter() - started < 60
    with torch.device("meta"):
        hf = T.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in hf.parameters())
    assert program.manifest["parameters"]["total"] == expected == sum(p.numel() for p in model.parameters())
    assert expected > 116e9


def test_bundled_gpt_oss_120b_moe_is_the_importers_output(tmp_path):
    """specs/gpt_oss_120b_moe.yaml is what `moec import hf` writes for GptOssConfig() (model section)."""
    config = T.GptOssConfig()
    config.architectures = ["GptOssForCausalLM"]
    config.save_pretrained(tmp_path)
    result = import_hf(tmp_path, tmp_path / "gpt_oss_120b_moe.yaml")
    assert moec.load_spec(result.spec).model == moec.load_spec(SPEC).model
