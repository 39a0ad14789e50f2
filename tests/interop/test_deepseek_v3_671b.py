"""DeepSeek-V3 671B from transformers' DeepseekV3Config (the released YaRN rope): imported, built on the meta device, the
parameter count against HF's DeepseekV3ForCausalLM (also on the meta device), and the bundled spec's fit for 80 GB
devices. Nothing is allocated."""

import torch
import transformers as T
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

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
    """The built model's parameters are HF's plus DeepSeek-V3's MTP module (HF builds none: counted here as HF's MoE
    decoder layer, enorm, hnorm, eh_proj [d, 2d] and the module's final norm; the embedding and head are shared);
    both hold the selection bias (e_score_correction_bias) as a buffer, which the manifest's total counts too. The
    import of a config without MTP weights gives the bundled model section without head.mtp."""
    config = released_config()
    config.save_pretrained(tmp_path)
    result = import_hf(tmp_path, tmp_path / "deepseek_v3_671b.yaml")
    spec = moec.load_spec(SPEC)
    without_mtp = spec.model.model_copy(update={"head": spec.model.head.model_copy(update={"mtp": None})})
    assert moec.load_spec(result.spec).model == without_mtp and spec.model.head.mtp.depth == 1
    with torch.device("meta"):
        hf = T.DeepseekV3ForCausalLM(config)
        mtp_layer = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)  # an MoE layer, as DeepSeek's MTP layer
    parameters = sum(p.numel() for p in hf.parameters())
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert (parameters, biases) == (671_026_404_352, 58 * 256)
    d = config.hidden_size
    mtp = sum(p.numel() for p in mtp_layer.parameters()) + 3 * d + 2 * d * d
    assert mtp == 11_610_067_968
    manifest = moec.compile_spec(spec).manifest
    assert manifest["parameters"]["total"] == parameters + mtp + biases + 256
    model = moec.build_model(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameters + mtp
    assert sum(p.numel() for p in model.mtp.parameters()) == mtp
    assert sum(b.numel() for name, b in model.named_buffers() if name.endswith("selection_bias")) == biases + 256
    state, activations = needed_bytes(spec, manifest, spec.mesh.world_size)  # the trainer's fit check, per device
    print(f"per device: {state / 1e9:.1f} GB state, {activations / 1e9:.1f} GB activations")
    assert state + activations < 80e9
