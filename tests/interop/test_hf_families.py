"""HF families through ``moec import hf``: logits, model-scope aux loss and gradients against transformers.

Each tiny model is built from a config with random weights (std 0.2, so logits are far from
zero), saved to a temporary directory (nothing is downloaded), imported, built from the spec
+ weights file, and compared on random ids in fp32. Then exported back: same state dict.
"""

import json

import pytest
import torch
import transformers as T

import moec
from moec.interop import UnsupportedConfig, export_hf, import_hf
from moec.interop.errors import NotExportable
from moec.interop.families.base import expert_count
from moec.interop.hf_weights import Converter
from moec.interop.hf_config import family_of, moe_layer_indices

SMALL = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64, router_aux_loss_coef=0.02)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)
# original 16 < the test's 24 positions: the YaRN ramp and the sliding window (5) both act.
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False}
GROUPED = dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=1,
               **{k: v for k, v in SMALL.items() if k not in ("router_aux_loss_coef", "num_key_value_heads")})
DSV3 = dict(GROUPED, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            num_nextn_predict_layers=1)
DSV3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
GLM = dict(GROUPED, num_key_value_heads=2, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                       "partial_rotary_factor": 1.0})

FAMILIES = {  # name -> config; renormalisation on and off where the family has the choice
    "mixtral": lambda: T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe-renorm": lambda: T.Qwen2MoeConfig(**SMALL, **MOE, num_experts=4, shared_expert_intermediate_size=20,
                                                 norm_topk_prob=True, pad_token_id=0),
    "qwen2_moe-sparse_step": lambda: T.Qwen2MoeConfig(**SMALL, **MOE, num_experts=4, shared_expert_intermediate_size=20,
                                                      norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe-renorm": lambda: T.Qwen3MoeConfig(**SMALL, **MOE, num_experts=4, norm_topk_prob=True, head_dim=16),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**SMALL, **MOE, num_experts=4, norm_topk_prob=False),
    "olmoe": lambda: T.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=1, eos_token_id=2),
    "olmoe-renorm": lambda: T.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=1,
                                          eos_token_id=2),
    "gpt_oss": lambda: T.GptOssConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=5,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=0.7,
                                      rope_parameters=YARN),
    # DeepSeek-V3 / GLM-4.5-MoE: no aux loss in HF; first_k_dense_replace 1, 8 experts in 1 or 4 groups.
    "deepseek_v3-q_lora-groups": lambda: T.DeepseekV3Config(**DSV3, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True),
    "deepseek_v3-plain_q-yarn": lambda: T.DeepseekV3Config(**DSV3, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                                           rope_interleave=False, rope_parameters=DSV3_YARN, attention_bias=True),
    # GLM-4.5's partial rotary: the first half of each head (4 of 8 dims) rotates
    "glm4_moe-groups-qk_norm-partial_rotary": lambda: T.Glm4MoeConfig(
        **GLM | {"rope_parameters": GLM["rope_parameters"] | {"partial_rotary_factor": 0.5}}, n_group=4, topk_group=2,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5),
    "glm4_moe": lambda: T.Glm4MoeConfig(**GLM, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5),
    "llama": lambda: T.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "router_aux_loss_coef"}, tie_word_embeddings=True),
    "qwen2": lambda: T.Qwen2Config(**{k: v for k, v in SMALL.items() if k != "router_aux_loss_coef"}),
}
MEASURED: dict[str, dict[str, float]] = {}


def randomised(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight") else 0.2 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's selection bias: moves the choice, not the weights
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = randomised(FAMILIES[request.param]())
    hf.save_pretrained(root / "hf")
    result = import_hf(root / "hf", root / "spec.yaml")
    spec = moec.load_spec(result.spec)
    return request.param, hf, spec, result, root


def hf_grads_as_moec(hf, config: dict) -> dict[str, torch.Tensor]:
    family = family_of(config)
    convert = Converter(family, moe_layer_indices(config, family), expert_count(config))
    out = {}
    for name, param in hf.named_parameters():
        out.update(dict(convert(name, param.grad)))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(name, hf, model, spec, config, record=True):
    ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    hf.zero_grad(), model.zero_grad()
    is_moe = "router_aux_loss_coef" in config
    theirs = hf(ids, output_router_logits=is_moe)
    ours = model(ids)
    vocab = config["vocab_size"]
    ce = torch.nn.functional.cross_entropy
    hf_aux = config["router_aux_loss_coef"] * theirs.aux_loss if is_moe else torch.zeros(())
    (ce(theirs.logits.reshape(-1, vocab), labels.reshape(-1)) + hf_aux).backward()
    (ce(ours.output.reshape(-1, vocab), labels.reshape(-1)) + ours.aux_loss).backward()
    logit_diff = (ours.output - theirs.logits).abs().max().item()
    aux_diff = (ours.aux_loss - hf_aux).abs().item()
    grads = dict(model.named_parameters())
    grad_diff = max(rel(grads[key].grad, g) for key, g in hf_grads_as_moec(hf, config).items())
    if record:
        MEASURED[name] = {"logits": logit_diff, "aux": aux_diff, "grad_rel": grad_diff, "logit_scale": theirs.logits.abs().max().item()}
    assert logit_diff < 1e-5 * max(1.0, theirs.logits.abs().max().item()), logit_diff
    assert aux_diff < 1e-6, (ours.aux_loss.item(), hf_aux.item())
    assert grad_diff < 1e-5


def test_logits_aux_and_gradients_match_transformers(imported):
    name, hf, spec, result, root = imported
    config = json.loads((root / "hf" / "config.json").read_text())
    model = moec.build_model(spec, weights=result.weights).train()  # no dropout, no router noise: train == eval here
    if "partial_rotary" in name:
        assert spec.model.blocks[0].layers[0].rope.fraction == 0.5
    compare(name, hf.train(), model, spec, config)
    print(name, MEASURED[name])


def test_round_trip_gives_the_same_state_dict_and_logits(imported):
    name, hf, spec, result, root = imported
    export_hf(spec, result.weights, root / "back")
    # Both loaded the same way (from_config and from_pretrained may pick different expert kernels).
    hf = T.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    again = T.AutoModelForCausalLM.from_pretrained(root / "back").eval()
    ours, theirs = hf.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, spec.model.inputs.vocab, (1, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, again(ids).logits)


@pytest.mark.slow
def test_compiled_program_matches_transformers(tmp_path):
    """Once (compiling is slow on the CPU): Qwen2-MoE, which uses every new feature but q/k norm."""
    from torch._dynamo.utils import counters

    hf = randomised(FAMILIES["qwen2_moe-renorm"]())
    hf.save_pretrained(tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "spec.yaml")
    spec = moec.load_spec(result.spec)
    model = moec.build_model(spec, weights=result.weights)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    class Wrapped(torch.nn.Module):  # compare() reads parameters from the eager module the compiled one shares
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return compiled(ids)

        def named_parameters(self, *args, **kwargs):
            return model.named_parameters(*args, **kwargs)

    compare("qwen2_moe-compiled", hf.train(), Wrapped(), spec, config)
    assert counters["stats"].get("unique_graphs") == 1


def test_unsupported_fields_are_refused_by_name(tmp_path):
    config = T.Qwen3MoeConfig(**SMALL, **MOE, num_experts=4).to_dict() | {"architectures": ["Qwen3MoeForCausalLM"],
                                                                            "kv_lora_rank": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfig, match="'kv_lora_rank'"):
        import_hf(tmp_path, tmp_path / "out" / "spec.yaml")
    config = T.MixtralConfig(**SMALL, num_local_experts=4, sliding_window=16).to_dict() | {"architectures": ["MixtralForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfig, match="'sliding_window' = 16"):
        import_hf(tmp_path, tmp_path / "out" / "spec.yaml")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV2ForCausalLM"], "q_lora_rank": 1536}))
    with pytest.raises(UnsupportedConfig, match="DeepseekV2ForCausalLM"):
        import_hf(tmp_path, tmp_path / "out" / "spec.yaml")
    config = FAMILIES["glm4_moe"]().to_dict() | {"architectures": ["Glm4MoeForCausalLM"]}
    config["rope_parameters"]["partial_rotary_factor"] = 0.3  # 2.4 of head_dim 8: no whole number of dims rotates
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfig, match=r"rope.fraction: rotates head_dim \(8\) x 0.3 = 2.4 dims"):
        import_hf(tmp_path, tmp_path / "out" / "spec.yaml")
    config = FAMILIES["deepseek_v3-q_lora-groups"]().to_dict() | {"architectures": ["DeepseekV3ForCausalLM"], "topk_method": "noaux_tc"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfig, match="'topk_method'"):
        import_hf(tmp_path, tmp_path / "out" / "spec.yaml")


def test_deepseek_v3_import_says_it_leaves_out_multi_token_prediction(tmp_path):
    """A directory without the MTP layer's tensors (HF's DeepseekV3ForCausalLM builds none): the spec gets no MTP,
    and the import says so (tests/interop/test_deepseek_v3_mtp.py imports a checkpoint that holds one)."""
    config = FAMILIES["deepseek_v3-q_lora-groups"]()
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.save_pretrained(tmp_path)
    result = import_hf(tmp_path, tmp_path / "spec.yaml")
    assert result.notes == ["1 multi-token prediction layer(s) (num_nextn_predict_layers; the checkpoint holds none)"]
    assert "# Not imported: 1 multi-token prediction layer(s)" in result.spec.read_text()
    spec = moec.load_spec(result.spec)
    assert [block.layers[1].kind for block in spec.model.blocks] == ["mlp", "moe"]  # first_k_dense_replace 1


def test_directory_without_weights_imports_the_architecture(tmp_path):
    config = T.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, eos_token_id=2)
    config.architectures = ["OlmoeForCausalLM"]
    config.save_pretrained(tmp_path)
    result = import_hf(tmp_path, tmp_path / "spec.yaml")
    assert result.weights is None and not list(tmp_path.glob("spec*.safetensors"))
    spec = moec.load_spec(result.spec)
    model = moec.build_model(spec)  # from the spec seed
    ref = moec.reference_model(spec)
    ids = model.example_inputs(batch=1, seq=8)[0]
    torch.testing.assert_close(model(ids).output, ref(ids).output, rtol=1e-5, atol=1e-6)


def test_sharded_weights_round_trip(tmp_path):
    """Small shards on both sides: the index files are written and read."""
    hf = randomised(FAMILIES["mixtral"]())
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    result = import_hf(tmp_path / "hf", tmp_path / "spec.yaml", shard_bytes=20_000)
    assert result.weights.name == "spec.safetensors.index.json"
    spec = moec.load_spec(result.spec)
    model = moec.build_model(spec, weights=result.weights)
    export_hf(spec, model.state_dict(), tmp_path / "back", shard_bytes=20_000)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for key, value in hf.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_deepseek_v3_tiny_exports_and_transformers_computes_the_same_logits(tmp_path):
    """The bundled CPU spec (MLA, dense-first, 16 experts in 4 groups, a shared expert) as DeepseekV3ForCausalLM.

    HF's DeepseekV3ForCausalLM has no balance loss, so export refuses a non-zero load_balance; the test drops it.
    head.mtp is written as DeepSeek-V3's checkpoints hold it, a layer after the model's, which transformers ignores.
    """
    with pytest.raises(NotExportable, match="load_balance"):
        export_hf(moec.load_spec("specs/deepseek_v3_tiny.yaml"), {}, tmp_path / "refused")
    spec = moec.load_spec("specs/deepseek_v3_tiny.yaml", overrides=["model.blocks[1].layers[1].aux={load_balance: 0, load_balance_scope: model}"])
    model = moec.build_model(spec).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("selection_bias"):
                buffer.copy_(0.01 * torch.randn_like(buffer))
    export_hf(spec, model.state_dict(), tmp_path)
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM" and hf.config.first_k_dense_replace == 2
    assert hf.config.num_nextn_predict_layers == 1 and hf.config.num_hidden_layers == 4
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).output, hf(ids).logits
    assert rel(ours, theirs) < 1e-5
