"""The spec features HF families need, generated program against the reference interpreter.

q/k/v-only bias, q/k RMSNorm (per head and whole projection), partial rotary (GLM-4.5), the embedding
padding row, the gated shared expert and the model-scope (pooled) load-balance loss.
"""

import pytest
import torch

import moec
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with

ATTENTION = """        - kind: attention
          heads: 2
          kv_heads: 1
          bias: {bias}
          qk_norm: {{scope: {scope}}}
{rope}"""
MOE = """        - kind: moe
          experts: 4
          top_k: 2
          expert: {{hidden: 8, activation: swiglu}}
          router: {{normalize: {normalize}}}
{shared}          aux: {{load_balance: 0.05, load_balance_scope: {scope}, z_loss: 0.001}}
"""
SHARED = "          shared_experts: {count: 1, hidden: 12, gate: true}\n"

VARIANTS = {  # Qwen2-MoE, Qwen3-MoE, OLMoE shaped
    "qkv_bias_gated_shared_pooled": dict(bias="qkv", scope="head", normalize="false", shared=SHARED, lb="model"),
    "head_norm_pooled": dict(bias="false", scope="head", normalize="true", shared="", lb="model"),
    "projection_norm_layer_scope": dict(bias="true", scope="projection", normalize="false", shared=SHARED, lb="layer"),
    # GLM-4.5 shaped: q/k/v bias, per-head q/k norm, half of each head rotated
    "qkv_bias_head_norm_partial_rotary": dict(bias="qkv", scope="head", normalize="true", shared="", lb="model",
                                              rope="          rope: {fraction: 0.5}\n"),
}


def feature_spec(variant: str, pad_id: int | None = 3):
    v = VARIANTS[variant]
    layers = ATTENTION.format(bias=v["bias"], scope=v["scope"], rope=v.get("rope", "")) + MOE.format(normalize=v["normalize"], shared=v["shared"], scope=v["lb"])
    text = spec_with(layers, name=variant, repeat=3).source.text
    if pad_id is not None:
        text = text.replace("vocab: 256}", f"vocab: 256, pad_id: {pad_id}}}")
    return moec.load_spec_text(text, file=f"{variant}.yaml")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_features_agree_with_the_reference(variant):
    assert_agree(feature_spec(variant), seeds=(0, 1), shapes=((2, 16), (1, 3)))


def test_pooled_load_balance_of_one_layer_is_the_layer_loss():
    def aux(scope):
        text = spec_with(MOE.format(normalize="true", shared="", scope=scope), name="one").source.text
        model = moec.build_model(moec.load_spec_text(text, file="one.yaml")).eval()
        return model(model.example_inputs(batch=2, seq=8)[0]).aux_loss

    torch.testing.assert_close(aux("model"), aux("layer"), rtol=1e-6, atol=0)


def test_pad_row_gets_no_gradient():
    spec = feature_spec("head_norm_pooled", pad_id=3)
    model = moec.build_model(spec)
    ids = torch.tensor([[3, 5, 3, 7]])
    model(ids).output.sum().backward()
    grad = model.embed.weight.grad
    assert grad[3].abs().max() == 0 and grad[5].abs().max() > 0


GPT_OSS = """        - kind: attention
          heads: 4
          kv_heads: 2
          bias: true
          sinks: true
          window: 3
          rope: {theta: 150000, scaling: {kind: yarn, factor: 32, original_max_seq_len: 8, truncate: false}}
        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 8, activation: clamped_swiglu, bias: true, swiglu_limit: 0.5}
          router: {bias: true}
          aux: {load_balance: 0.01, load_balance_scope: model}
"""


@pytest.mark.parametrize("kernel", ["grouped_mm", "eager"])
def test_gpt_oss_features_agree_with_the_reference(kernel):
    """Sinks, a sliding window, YaRN, clamped SwiGLU experts with biases, a router bias."""
    text = spec_with(GPT_OSS, name="oss", repeat=2).source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
    assert_agree(moec.load_spec_text(text, file="oss.yaml"), seeds=(0, 1), shapes=((2, 16), (1, 3)))
