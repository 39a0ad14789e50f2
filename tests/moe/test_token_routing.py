"""Router kind ``token_id`` (issue 14, the complexity seed's TokenRoutedMLP): a token goes to the
expert its id names (``id % experts`` or ``table[id % len(table)]``), weight 1, nothing learned.
Checked by hand, against the reference interpreter (outputs, aux, gradients) for each kernel, and
by the expert loads the built model reports."""

import pytest
import torch

import moec
from moec.backends.reference import routing
from moec.backends.torch import snippets
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with

LAYER = "        - kind: attention\n          heads: 2\n        - kind: moe\n          experts: 4\n          top_k: 1\n"


def token_spec(options: str, name: str, expert: str = "{hidden: 8, activation: swiglu}", repeat: int = 1):
    return spec_with(LAYER + f"          expert: {expert}\n" + options, name=name, repeat=repeat)


def test_token_route_by_hand():
    ids = torch.tensor([[0, 5, 9, 255], [3, 4, 6, 7]])
    expected_modulo = torch.tensor([[0, 1, 1, 3], [3, 0, 2, 3]])
    expected_table = torch.tensor([[2, 2, 2, 2], [2, 0, 2, 0]])  # table (2, 0, 2) at id % 3
    for table, expected in (((), expected_modulo), ((2, 0, 2), expected_table)):
        attrs = {"experts": 4, **({"table": table} if table else {})}
        reference = routing.token_route(None, attrs, ids)
        assert torch.equal(reference, torch.nn.functional.one_hot(expected, 4).float())
        assert torch.equal(snippets.token_route(ids, 4, table), reference)


VARIANTS = {  # (options, expert, kernel)
    "modulo_grouped_mm": ("          router: {kind: token_id}\n", "{hidden: 8, activation: swiglu}", "grouped_mm"),
    "table_capacity_bmm": ("          router: {kind: token_id, table: [3, 1, 1, 0, 2]}\n"
                           "          capacity: {mode: capacity, factor: 0.75, drop_policy: zero}\n", "{hidden: 8, activation: swiglu}", "bmm"),
    "modulo_shared_eager": ("          router: {kind: token_id}\n          shared_experts: {count: 1, hidden: 8}\n",
                            "{hidden: 8, activation: swiglu}", "eager"),
    "table_expert_bias": ("          router: {kind: token_id, table: [1, 2]}\n", "{hidden: 8, activation: gelu, bias: true}", "grouped_mm"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_id_router_agrees_with_the_reference(variant):
    options, expert, kernel = VARIANTS[variant]
    text = token_spec(options, variant, expert).source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
    assert_agree(moec.load_spec_text(text, file=f"{variant}.yaml"), seeds=(0, 3), shapes=((2, 16), (1, 3)))


def test_token_id_has_no_router_weight_and_routes_every_token_by_its_id():
    spec = token_spec("          router: {kind: token_id, table: [3, 1]}\n", "loads", repeat=2)
    model = moec.build_model(spec).eval()
    assert not [name for name in model.state_dict() if "router" in name]
    ids = torch.tensor([[0, 1, 2, 3, 4, 6, 8, 9]])
    out = model(ids)
    for stats in out.moe_stats:  # table [3, 1]: even ids to expert 3, odd ids to expert 1
        assert stats.counts.tolist() == [0, 3, 0, 5]
    assert out.aux_loss.item() == 0.0


# capacity.tokens: C slots per expert whatever the batch (learned routers too), against the reference.
CAPACITY_TOKENS = {"bmm_c5": ("bmm", 5), "grouped_mm_c3": ("grouped_mm", 3), "eager_c40": ("eager", 40)}


@pytest.mark.parametrize("variant", list(CAPACITY_TOKENS))
def test_capacity_tokens_agrees_with_the_reference(variant):
    kernel, slots = CAPACITY_TOKENS[variant]
    layer = LAYER.replace("top_k: 1", "top_k: 2") + "          expert: {hidden: 8, activation: swiglu}\n"
    layer += f"          capacity: {{mode: capacity, tokens: {slots}, drop_policy: renormalize}}\n"
    text = spec_with(layer, name=variant).source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
    assert_agree(moec.load_spec_text(text, file=f"{variant}.yaml"), seeds=(0, 3), shapes=((2, 16), (1, 3)))


@pytest.mark.parametrize("slots", [3, 100])
def test_capacity_tokens_keeps_that_many_per_expert(slots):
    spec = token_spec(f"          router: {{kind: token_id}}\n          capacity: {{mode: capacity, tokens: {slots}}}\n", f"c{slots}")
    assert "capacity = {} ".format(slots) in moec.compile_spec(spec).source
    ids = torch.tensor([[0, 4, 8, 12, 16, 1, 5, 2]])  # expert 0: 5 tokens, expert 1: 2, expert 2: 1
    stats = moec.build_model(spec).eval()(ids).moe_stats[0]
    assert stats.counts.tolist() == [5, 2, 1, 0]
    assert stats.dropped.item() == pytest.approx(max(0, 5 - slots) / 8)


def test_bench_feeds_token_ids_to_a_token_id_layer():
    from moec.bench.layers import LayerShape, MoecLayer, layer_spec_text

    shape = LayerShape(tokens=8, width=16, hidden=8, experts=4, top_k=1)
    layer_yaml = "{kind: moe, experts: 4, top_k: 1, router: {kind: token_id}, expert: {hidden: 8, activation: swiglu}}"
    layer = MoecLayer(layer_spec_text(shape, layer_yaml), "cpu", torch.float32)
    out, aux = layer(torch.randn(1, 8, 16))
    assert layer.routes_by_id and out.shape == (1, 8, 16) and aux.item() == 0.0
