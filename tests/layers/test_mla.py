"""The ``mla`` layer kind (multi-head latent attention): the program against the reference interpreter and against HF's
``DeepseekV3Attention``, decoding through the latent cache, its cost figures and the form of its class."""

import ast
import re

import pytest
import torch

import moec
from moec.compile import build_model, compile_spec
from moec.ir.ops import OPS
from moec.passes.flops import flops_per_token
from moec.schema.checks import estimate_params
from tests.backends.test_torch_differential import assert_agree, rel_error
from tests.passes.helpers import spec_with
from tests.serve.test_decode import _randomised

D, HEADS, Q_RANK, KV_RANK, NOPE, ROPE, V = 32, 4, 24, 16, 8, 4, 6
YARN = "{kind: yarn, factor: 4.0, original_max_seq_len: 16, mscale: 1.0, mscale_all_dim: 0.8}"
VARIANTS = {  # name -> extra fields of the mla layer
    "q_lora": f"          q_lora_rank: {Q_RANK}\n",
    "plain_q_yarn_bias": f"          bias: true\n          rope: {{scaling: {YARN}}}\n",
    "q_lora_yarn_rotate_half": f"          q_lora_rank: {Q_RANK}\n          rope: {{interleave: false, scaling: {{kind: yarn, factor: 2.0, "
                               "original_max_seq_len: 32}}\n",
}


def mla_layer(extra: str = "") -> str:
    return (f"        - kind: mla\n          heads: {HEADS}\n          kv_lora_rank: {KV_RANK}\n          qk_nope_head_dim: {NOPE}\n"
            f"          qk_rope_head_dim: {ROPE}\n          v_head_dim: {V}\n" + extra)


def mla_spec(variant: str, repeat: int = 2, kernel: str | None = None):
    layers = mla_layer(VARIANTS[variant]) + "        - kind: mlp\n          hidden: 32\n"
    spec = spec_with(layers, name=f"mla_{variant}", d_model=D, repeat=repeat)
    if kernel is None:
        return spec
    text = spec.source.text.replace("train:\n", f"schedule:\n  kernels: {{attention: {kernel}}}\ntrain:\n")
    return moec.load_spec_text(text, file=f"mla_{variant}.yaml")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_program_agrees_with_the_reference(variant):
    """Outputs and every gradient to 1e-5 relative, q_lora_rank 0 and > 0, with and without YaRN (DeepSeek's mscale)."""
    assert_agree(mla_spec(variant), seeds=(0, 1), shapes=((2, 16), (1, 3)))


def test_eager_attention_kernel_agrees_with_the_reference():
    spec = mla_spec("plain_q_yarn_bias", kernel="eager")
    assert "mla_attention_eager(" in compile_spec(spec).source
    assert_agree(spec, seeds=(0,), shapes=((2, 16),))


# --- HF transformers' DeepseekV3Attention -------------------------------------------------------------------------------

HF_CASES = {  # name -> (moec variant, DeepseekV3Config fields)
    "q_lora": ("q_lora", {"q_lora_rank": Q_RANK}),
    "plain_q_yarn_bias": ("plain_q_yarn_bias", {
        "q_lora_rank": None, "attention_bias": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}}),
    "q_lora_yarn_rotate_half": ("q_lora_yarn_rotate_half", {
        "q_lora_rank": Q_RANK, "rope_interleave": False,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32}}),
}
HF_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
            "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_hf_deepseek_v3_attention(case):
    """The built layer with HF's random weights copied in: outputs within 1e-5 of ``DeepseekV3Attention`` (fp32, eager)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    variant, fields = HF_CASES[case]
    fields = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **fields}
    config = DeepseekV3Config(hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=HEADS, kv_lora_rank=KV_RANK,
                              qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=64, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # random weights everywhere, the latent norms' around 1
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layernorm" in name else 0.0))
    layer = build_model(mla_spec(variant, repeat=1)).blocks[0].mla.eval()
    state = {f"{ours}.{leaf}": hf.get_submodule(theirs).get_parameter(leaf)
             for ours, theirs in HF_NAMES.items() if hasattr(layer, ours) for leaf in ("weight", "bias")
             if getattr(getattr(layer, ours), leaf, None) is not None}
    layer.load_state_dict(state, strict=True)

    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12)[None].expand(2, 12)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = hf(x, DeepseekV3RotaryEmbedding(config)(x, positions), mask)
        got = layer(x)
    assert rel_error(got, expected) < 1e-5


# --- generation through the latent cache ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoding_model():
    return _randomised(mla_spec("plain_q_yarn_bias"))


def test_decode_through_the_latent_cache_equals_the_full_forward(decoding_model):
    model = decoding_model
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens).output
        cache = model.new_cache(2, 64)
        steps = [model.prefill(tokens[:, :11], cache)]
        for position in range(11, 40):
            steps.append(model.decode_step(tokens[:, position:position + 1], cache, position)[:, None])
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def cache_bytes_per_token(model) -> int:
    """Bytes the model's KV cache holds per token: every layer's tensors at one position."""
    cache = model.new_cache(1, 16)
    return sum(t[0, :, 0].numel() * t.element_size() for layer in cache for t in layer)


def test_the_cache_holds_the_latent_and_the_rope_key(decoding_model):
    """kv_lora_rank + qk_rope_head_dim values per token and layer, against the same model with multi-head attention:
    same heads, head_dim = qk_nope + qk_rope (moec's attention has one head_dim for keys and values)."""
    mla = cache_bytes_per_token(decoding_model)
    assert mla == 2 * (KV_RANK + ROPE) * 4  # two layers, fp32
    mha_spec = spec_with(f"        - kind: attention\n          heads: {HEADS}\n          head_dim: {NOPE + ROPE}\n"
                         "        - kind: mlp\n          hidden: 32\n", d_model=D, repeat=2)
    mha = cache_bytes_per_token(build_model(mha_spec))
    assert mha == 2 * 2 * HEADS * (NOPE + ROPE) * 4
    assert (mla, mha) == (160, 768)


# --- cost and form ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_and_flops_are_exact(variant):
    spec = mla_spec(variant)
    program = compile_spec(spec)
    assert estimate_params(spec) == sum(p.numel() for p in build_model(spec, program=program).parameters())
    rank = Q_RANK if "q_lora" in variant else 0
    q = (D * rank + rank * HEADS * (NOPE + ROPE)) if rank else D * HEADS * (NOPE + ROPE)
    linears = q + D * (KV_RANK + ROPE) + KV_RANK * HEADS * (NOPE + V) + HEADS * V * D + 2 * D * 32
    attention = 2 * spec.train.seq_len * HEADS * (NOPE + ROPE + V)
    assert flops_per_token(spec, program.graph) == 2 * (2 * linears + attention) + 2 * D * 256


def test_mla_class_reads_like_a_model(snapshot):
    """torchtitan's / HF's MLA: nn.Linear / nn.RMSNorm modules with their names, role names, no SSA names; decoding reads
    and writes the latent cache only."""
    source = compile_spec(mla_spec("q_lora")).source
    tree = ast.parse(source)
    (mla,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "MLA"]
    text = ast.get_source_segment(source, mla)
    for line in ("self.wq_a = nn.Linear(32, 24", "self.q_norm = nn.RMSNorm(24, eps=1e-06", "self.wq_b = nn.Linear(24, 48",
                 "self.wkv_a = nn.Linear(32, 20", "self.kv_norm = nn.RMSNorm(16", "self.wkv_b = nn.Linear(16, 56",
                 "self.wo = nn.Linear(24, 32", "q = self.wq_b(self.q_norm(q))", "kv = self.kv_norm(kv)",
                 "kv, k_pe = latent_cache(kv, k_pe, cache.kv[self.slot], cache.positions, cache.bucket)"):
        assert line in text, line
    ssa = re.compile(rf"^({'|'.join(sorted(OPS, key=len, reverse=True))})_?\d+$")
    stored = [n.id for n in ast.walk(mla) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
    assert not [name for name in stored if ssa.match(name)], stored
    assert "KV_LAYERS = ((1, 16, 4),) * 2" in source
    assert text == snapshot
