"""DeepSeek-V3 671B from transformers' DeepseekV3Config (the released YaRN rope): imported, built on the meta device, the
parameter count against HF's DeepseekV3ForCausalLM (also on the meta device), and the bundled spec's fit for 80 GB
devices. Nothing is allocated."""

import torch
import transformers as T

import moec
from moec.interop import import_hf
from moec.train.fit import needed_bytes

SPEC = "specs/deepseek_v3_671b.yaml"
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def released_config() -> T.DeepseekV3Config:
    config = T.DeepseekV3Config(max_position_embeddings=163840, rope_parameters=dict(YARN))
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


def test_bundled_spec_is_the_importers_output_with_hf_parameter_count_and_fits_80_gb(tmp_path):
    """The built model's parameters are HF's; both hold the selection bias (e_score_correction_bias) as a buffer, which the
    manifest's total counts too. No MTP on either side."""
    config = released_config()
    config.save_pretrained(tmp_path)
    result = import_hf(tmp_path, tmp_path / "deepseek_v3_671b.yaml")
    assert moec.load_spec(result.spec).model == moec.load_spec(SPEC).model
    with torch.device("meta"):
        hf = T.DeepseekV3ForCausalLM(config)
    parameters = sum(p.numel() for p in hf.parameters())
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert (parameters, biases) == (671_026_404_352, 58 * 256)
    spec = moec.load_spec(SPEC)
    manifest = moec.compile_spec(spec).manifest
    assert manifest["parameters"]["total"] == parameters + biases
    model = moec.build_model(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert sum(b.numel() for name, b in model.named_buffers() if name.endswith("selection_bias")) == biases
    state, activations = needed_bytes(spec, manifest, spec.mesh.world_size)  # the trainer's fit check, per device
    assert state + activations < 80e9
