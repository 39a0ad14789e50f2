"""Each pass on small graphs: what it changes, that it leaves other graphs alone, and errors."""

import pytest

import moec
from moec.ir import Graph, Node, Ref, verify
from moec.passes import run_pipeline
from moec.passes.cleanup import cse, dce
from moec.moe import AuxAttrs, CapacityAttrs, ExpertAttrs, MoeAttrs, RouterAttrs
from moec.passes.fuse_moe import fuse_moe
from moec.passes.fuse_spectral import fuse_spectral
from moec.passes.lower import lower
from moec.passes.shapes import infer_shapes
from moec.passes.sharding import annotate_sharding
from tests.ir.test_ir import typed_tiny_graph
from tests.passes.helpers import MOE, SPECTRAL, spec_with


def ops(graph: Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def typed(spec) -> Graph:
    graph, _ = infer_shapes(lower(spec))
    verify(graph)
    return graph


@pytest.mark.parametrize("fn", [fuse_moe, fuse_spectral, cse, dce])
def test_passes_leave_a_graph_without_their_pattern_unchanged(fn):
    graph = typed_tiny_graph()
    new, changed = fn(graph)
    assert not changed and new is graph


def test_infer_shapes_types_every_node_and_reports_mismatches_at_the_spec_line():
    graph = typed(spec_with(MOE))
    assert graph.typed and all(node.types for node in graph.nodes)
    broken = lower(spec_with(MOE))
    nodes = [n.with_(attrs={**n.attr, "shape": (4, 9)}) if n.name == "blocks.0.moe.router.weight" else n for n in broken.nodes]
    with pytest.raises(moec.SpecError) as caught:
        infer_shapes(broken.with_nodes(nodes))
    assert str(caught.value) == "t.yaml:11:11: model.blocks[0].layers[0].router: linear: linear input: last dim must be 9, got f32[B,S,16]"


def test_fuse_moe_turns_each_routing_chain_into_one_node():
    graph = typed(spec_with(MOE, repeat=2))
    fused, changed = fuse_moe(graph)
    verify(fused)
    assert changed and ops(fused)["moe"] == 2
    for gone in ("topk", "softmax", "dispatch", "expert_ffn", "combine", "load_balance_loss", "z_loss"):
        assert gone not in ops(fused)
    moe = next(node for node in fused.nodes if node.op == "moe")
    assert moe.attr["slots"] == ("h", "router_in", "router.weight", "experts.w_gate_up", "experts.w_down")
    attrs = moe.attr["moe"]
    assert (attrs.experts, attrs.top_k, attrs.router.kind, attrs.expert.activation) == (4, 2, "topk", "swiglu")
    assert (attrs.capacity.mode, attrs.aux.load_balance, attrs.router.normalize) == ("dropless", 0.01, True)
    assert [str(t) for t in moe.types] == ["f32[B,S,16]", "f32[]"]
    again, changed_again = fuse_moe(fused)
    assert not changed_again and again is fused


def test_fuse_moe_records_capacity_noise_sinkhorn_and_shared_experts():
    layer = """        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 8, activation: gelu}
          router: {kind: sinkhorn, noise: {kind: gumbel, std: 0.3}, sinkhorn: {iters: 3, tau: 0.5}}
          capacity: {mode: capacity, factor: 1.5, drop_policy: renormalize}
          shared_experts: {count: 2}
          aux: {load_balance: 0.02, z_loss: 0.001}
"""
    fused, _ = fuse_moe(typed(spec_with(layer)))
    verify(fused)
    (moe,) = [node for node in fused.nodes if node.op == "moe"]
    assert moe.attr["moe"] == MoeAttrs(
        experts=4, top_k=2,
        router=RouterAttrs(kind="sinkhorn", noise="gumbel", noise_std=0.3, normalize=True, sinkhorn_iters=3, sinkhorn_tau=0.5),
        expert=ExpertAttrs(activation="gelu"), capacity=CapacityAttrs(mode="capacity", factor=1.5, drop_policy="renormalize"),
        aux=AuxAttrs(load_balance=0.02, z_loss=0.001), shared=True)
    assert moe.attr["slots"][-2:] == ("shared.w_up", "shared.w_down")
    assert "linear" not in {fused[ref.node].op for ref in moe.inputs[2:]}


def test_fuse_moe_leaves_a_chain_whose_scores_are_read_elsewhere():
    graph = typed(spec_with(MOE))
    scores = next(node for node in graph.nodes if node.op == "softmax")
    # Another reader of the router scores: the chain is no longer private to the MoE.
    spy = Node("spy", "z_loss", inputs=(scores.out(),), attrs=(("weight", 1.0),), types=graph.type_of(graph.outputs[1]) and (graph.type_of(graph.outputs[1]),))
    total = Node("total", "add", inputs=(graph.outputs[1], Ref("spy")), types=spy.types)
    graph = graph.with_nodes([*graph.nodes, spy, total], outputs=(graph.outputs[0], Ref("total")))
    verify(graph)
    new, changed = fuse_moe(graph)
    assert not changed and new is graph


def test_fuse_spectral_makes_one_node_per_layer_with_shared_weights():
    graph, _ = fuse_moe(typed(spec_with(SPECTRAL, repeat=2, tokens=False)))
    assert ops(graph)["moe"] == 6  # 2 layers x depth 3
    fused, changed = fuse_spectral(graph)
    verify(fused)
    assert changed and ops(fused).get("spectral_moe") == 2 and "moe" not in ops(fused) and "rfft" not in ops(fused)
    node = next(n for n in fused.nodes if n.op == "spectral_moe")
    assert (node.attr["depth"], node.attr["band"], node.attr["fft_norm"]) == (3, "embedding", "ortho")
    assert node.attr["slots"] == ("x", "band.weight", "router.weight", "experts.w_up", "experts.w_down")


def test_fuse_spectral_needs_fused_moe_steps():
    graph = typed(spec_with(SPECTRAL, tokens=False))
    new, changed = fuse_spectral(graph)
    assert not changed and new is graph


def test_dce_drops_dangling_nodes_and_cse_merges_duplicates():
    graph = typed_tiny_graph()
    stray = Node("stray", "constant", attrs=(("value", 1.0),), types=graph["constant_2"].types)
    dead = graph.with_nodes([*graph.nodes, stray])
    cleaned, changed = dce(dead)
    assert changed and [n.name for n in cleaned.nodes] == [n.name for n in graph.nodes]
    twin = graph["linear_1"].with_(name="linear_9")
    doubled = graph.with_nodes([*graph.nodes[:3], twin, graph.nodes[3]], outputs=(Ref("linear_9"), Ref("constant_2")))
    merged, changed = cse(doubled)
    verify(merged)
    assert changed and merged.outputs[0] == Ref("linear_1") and "linear_9" not in merged.by_name


def test_annotate_sharding_places_experts_batch_tensor_and_pipeline():
    spectral = run_pipeline(moec.load_spec("specs/spectral_moe.yaml")).graph  # mesh (dp 8, ep 8)
    assert spectral["blocks.0.spectral_moe.moe.experts.w_up"].meta_dict["placement"] == ("Replicate()", "Shard(0)")
    assert spectral["blocks.0.spectral_moe.moe.router.weight"].meta_dict["placement"] == ("Replicate()", "Replicate()")
    assert spectral["input_0"].meta_dict["placement"] == ("Shard(0)", "Replicate()")
    gpt = run_pipeline(moec.load_spec("specs/gpt_oss_120b.yaml")).graph  # mesh (tp 8, pp 6, dp 4)
    assert gpt["blocks.0.attention.wq.weight"].meta_dict["placement"] == ("Shard(0)", "Replicate()", "Replicate()")
    assert gpt["blocks.0.attention.wo.weight"].meta_dict["placement"] == ("Shard(1)", "Replicate()", "Replicate()")
    # stages balanced by FLOPs (tests/passes/test_stages.py): blocks 0-12, 13-29, ..., 81-95 with the head
    assert [gpt[f"blocks.{i}.mlp.w_up.weight"].meta_dict["stage"] for i in (0, 12, 13, 80, 81, 95)] == [0, 0, 1, 4, 5, 5]
    assert gpt["head.weight"].meta_dict["stage"] == 5
    mixtral = run_pipeline(moec.load_spec("specs/moe_basics.yaml")).graph  # mesh (fsdp 8, ep 8), FSDP over fsdp
    assert mixtral["blocks.0.moe.experts.w_down"].meta_dict["placement"] == ("Shard(1)", "Shard(0)")
    assert mixtral["blocks.0.attention.wq.weight"].meta_dict["placement"] == ("Shard(0)", "Replicate()")
    single, changed = annotate_sharding(moec.load_spec("specs/token_routed_tiny.yaml"), typed_tiny_graph())
    assert not changed


def test_pipeline_disables_passes_by_name_and_logs_every_pass():
    spec = moec.load_spec("specs/token_routed_tiny.yaml")
    compiled = run_pipeline(spec, disable=("fuse_moe",))
    assert [r.name for r in compiled.log] == ["lower", "infer_shapes", "fuse_moe", "fuse_spectral", "annotate_sharding", "cse", "dce"]
    assert compiled.log[2].skipped and "moe" not in ops(compiled.graph)
    with pytest.raises(ValueError, match="unknown pass 'fuse_everything'"):
        run_pipeline(spec, disable=("fuse_everything",))
    with pytest.raises(ValueError, match="cannot be disabled"):
        run_pipeline(spec, disable=("infer_shapes",))
    full = run_pipeline(spec)
    assert full.log[2].added == {"moe": 2} and full.log[2].removed["expert_ffn"] == 2
