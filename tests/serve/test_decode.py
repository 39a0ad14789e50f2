"""The generated decode path (KV cache) against recomputing the whole sequence with ``forward``."""

import pytest
import torch

import moec
from moec.backends.init import init_parameter
from moec.backends.torch.decode import decode_support
from moec.observe.metrics import compiled_graphs
from moec.serve.generate import Generator
from moec.serve.sampling import Sampling
from tests.passes.helpers import spec_with

ATTENTION = "        - kind: attention\n          heads: 4\n          kv_heads: 2\n"
MOE = "        - kind: moe\n          experts: 4\n          top_k: 2\n          expert: {hidden: 16, activation: swiglu}\n"
VARIANTS = {
    "gqa_moe": ATTENTION + MOE,
    # factor 2 with top-2 of 4: C = N, nothing is dropped in the full pass either (decode steps are one token each)
    "capacity_bmm": ATTENTION + MOE + "          capacity: {mode: capacity, factor: 2.0, drop_policy: renormalize}\n",
    "sigmoid_bias": ATTENTION + MOE + "          router: {kind: sigmoid_bias, normalize: true}\n",
    "window_sinks_yarn": ATTENTION + "          window: 8\n          sinks: true\n"
                         "          rope: {theta: 10000, scaling: {kind: yarn, factor: 4.0, original_max_seq_len: 16}}\n" + MOE,
    "learned_positions": "        - kind: attention\n          heads: 2\n          rope: null\n" + MOE,
    "partial_rotary": ATTENTION + "          rope: {theta: 10000, fraction: 0.5}\n" + MOE,  # GLM-4.5: half of each head rotates
    # the complexity seed: routing by token id (the new token's id reaches the MoE) and INL dynamics (per position)
    "token_id_dynamics": ATTENTION + "        - kind: moe\n          experts: 4\n          top_k: 1\n"
                         "          expert: {hidden: 16, activation: swiglu}\n          router: {kind: token_id}\n"
                         "        - kind: dynamics\n          controller_hidden: 8\n",
}


def _spec(variant: str):
    text = spec_with(VARIANTS[variant], name=variant, d_model=32, repeat=2).source.text
    if variant == "learned_positions":
        text = text.replace("  blocks:", "  position: learned\n  blocks:")
    return moec.load_spec_text(text, file=f"{variant}.yaml")


def _randomised(spec, seed=1):
    """The model with random weights everywhere (the seed's init leaves sinks and biases at 0)."""
    model = moec.build_model(spec).eval()
    with torch.no_grad():
        for node in model.program.graph.params():
            name = node.attr["name"]
            param = dict(model.named_parameters()).get(name)
            if param is not None:
                param.copy_(init_parameter(node, seed) + 0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_with_the_cache_equals_recomputing(variant):
    model = _randomised(_spec(variant))
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens).output
        cache = model.new_cache(2, 64)
        steps = [model.prefill(tokens[:, :11], cache)]
        for position in range(11, 40):
            steps.append(model.decode_step(tokens[:, position:position + 1], cache, position)[:, None])
    error = (torch.cat(steps, 1) - full).abs().max().item()
    assert error < 1e-5, error


def test_rows_at_different_positions_decode_in_one_step():
    model = _randomised(_spec("gqa_moe"))
    a, b = (torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 17))
    with torch.no_grad():
        cache = model.new_cache(2, 64)
        single = [model.new_cache(1, 64) for _ in range(2)]
        for row, (seq, own) in enumerate(zip((a, b), single)):
            model.prefill(seq[:, :-1], own)
            for (k, v), (own_k, own_v) in zip(cache, own):
                k[row], v[row] = own_k[0], own_v[0]
        together = model.decode_step(torch.cat([a[:, -1:], b[:, -1:]]), cache, [8, 16])
    expected = torch.stack([model(a).output[0, -1], model(b).output[0, -1]])
    assert (together - expected).abs().max().item() < 1e-5


def test_models_without_a_cache_say_why():
    assert not hasattr(moec.build_model(moec.load_spec("specs/spectral_moe.yaml")), "decode_step")
    sinkhorn = moec.build_model(moec.load_spec("specs/signals_sinkhorn.yaml"))
    assert not hasattr(sinkhorn, "decode_step")
    assert decode_support(sinkhorn.program.graph) == "its sinkhorn router balances over all tokens of the batch"
    with pytest.raises(ValueError, match="takes continuous inputs: it is rolled out"):
        Generator(sinkhorn, sinkhorn.program.spec, compile=False)


@pytest.fixture(scope="module")
def compiled():
    spec = moec.load_spec("specs/token_routed_tiny.yaml")
    model = moec.build_model(spec)
    # dynamo's graph capture and guards decide the graph count; the eager backend skips Inductor's codegen (CI time)
    return Generator(model, spec, backend="eager"), spec


def test_compiled_decode_is_one_graph_per_bucket_and_greedy_is_deterministic(compiled):
    generator, _ = compiled
    prompt = list(b"def main(")  # 9 tokens: prefill pads to 16
    before = compiled_graphs()
    first = list(generator.stream(prompt, 100, Sampling(temperature=0)))
    # prefill [1,16] over bucket 16; decode at positions 9..108 over buckets 16, 32, 64, 128
    assert compiled_graphs() - before == 5
    again = list(generator.stream(prompt, 100, Sampling(temperature=0)))
    assert again == first and compiled_graphs() - before == 5
    with torch.no_grad():  # the greedy continuation is the argmax of recomputing, position by position
        full = generator.model(torch.tensor([prompt + first[:-1]])).output[0, len(prompt) - 1:]
    assert full.argmax(-1).tolist() == first


def test_sampling_is_seeded(compiled):
    generator, _ = compiled
    sampling = Sampling(temperature=0.8, top_k=40, top_p=0.9)
    one, two, other = (list(generator.stream(list(b"import "), 20, sampling, seed=s)) for s in (3, 3, 4))
    assert one == two and one != other
