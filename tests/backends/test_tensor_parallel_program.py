"""The tensor-parallel statements of a generated model.py, byte for byte, and what they do on one process.

A spec whose tensor-parallel axis has size 1 gets exactly the program of the spec without one; with
tp > 1 the statements of ``moec.backends.torch.codegen_tp`` appear, and the same file still runs
whole on one process (no group: f and g are the identity, head counts come from the widths).
"""

import pytest
import torch

import moec
from moec.backends.torch import tensor_parallel
from moec.backends.torch.tensor_parallel import kv_head_of
from moec.compile import build_model
from tests.distributed.tp_worker import TP2, TP2_VOCAB, dense_text, spec_text


def program(mesh: str = "", kv_heads: int = 2):
    return moec.compile_spec(moec.load_spec_text(spec_text(mesh, kv_heads), file="tp.yaml"))


def body(source: str) -> str:
    return source.split("SPEC_NAME = ")[1]  # after the header (its spec sha256 line differs)


def test_a_tensor_axis_of_size_one_changes_nothing():
    whole = program()
    one = program("mesh: {world_size: 2, axes: {dp: 2, tp: 1}}\nsharding:\n  batch: [dp]\n  tensor: {axis: tp}\n")
    assert body(one.source) == body(whole.source)
    assert "tensor_parallel" not in one.source and "def tensor_parallel" not in one.parallel_source


def _method(source: str, cls: str, method: str = "forward") -> list[str]:
    """The statements of ``cls.method`` without their trailing comments."""
    text = source.split(f"\nclass {cls}(nn.Module):\n")[1].split(f"    def {method}(")[1].split("\n\n")[0]
    return [line.split("  # ")[0] for line in text.splitlines()[1:]]


def test_the_tensor_parallel_lines_exactly():
    source = program(TP2).source
    assert "# Tensor parallel over tp (2): shapes are the whole model's; a rank holds 1/2 of each split group (parallel.py).\n" in source
    assert "\nfrom moec.backends.torch import tensor_parallel\n" in source
    assert _method(source, "Attention")[1:6] == [
        "        x_tp = tensor_parallel.copy(x)",
        "        q = F.linear(x_tp, tensor_parallel.local(self.wq))",
        "        k = F.linear(x_tp, tensor_parallel.local(self.wk))",
        "        v = F.linear(x_tp, tensor_parallel.local(self.wv))",
        "        q = rope(q, q.shape[-1] // 8, 8, 10000.0, positions)",
    ]
    assert ("        x_tp = tensor_parallel.copy(x)  # f: identity forward, gradient summed over the tensor-parallel ranks"
            in source)
    assert _method(source, "Attention")[-1] == "        return tensor_parallel.reduce(F.linear(attn, tensor_parallel.local(self.wo)))"
    assert _method(source, "FeedForward")[-1] == "        return tensor_parallel.reduce(F.linear(hidden, tensor_parallel.local(self.w_down)))"
    moe = _method(source, "MoE")
    assert "        rows = tensor_parallel.copy(x)[order // 2]" in moe
    assert "        up = grouped_linear(rows, tensor_parallel.local(self.experts.w_up), offsets)" in moe
    down = moe.index("        y_sorted = grouped_linear(hidden, tensor_parallel.local(self.experts.w_down), offsets)")
    assert moe[down + 1] == "        y_sorted = tensor_parallel.reduce(y_sorted)"


def test_a_replicated_kv_head_is_read_through_kv_shard():
    """1 KV head for 2 ranks: wk and wv stay whole (parallel.py does not split them, and says so), q's f
    serves k and v too, and each reads its rank's KV head; under sequence parallelism the gradient stays partial."""
    compiled = program(TP2, kv_heads=1)
    assert _method(compiled.source, "Attention")[1:5] == [
        "        x_tp = tensor_parallel.copy(x)",
        "        q = F.linear(x_tp, tensor_parallel.local(self.wq))",
        "        k = F.linear(x_tp, tensor_parallel.kv_shard(self.wk, 1))",
        "        v = F.linear(x_tp, tensor_parallel.kv_shard(self.wv, 1))",
    ]
    lines = compiled.parallel_source.split("def tensor_parallel")[1].splitlines()
    assert lines[6] == "    for block in model.blocks:"
    assert lines[7].startswith("        split(block.attention, {'wq': 0, 'wo': 1}, tp_mesh)  # attention.qkv column, attention.out row")
    assert lines[8] == ("        # block.attention wk, wv stay whole (1 KV head for 2 ranks): each rank reads the KV head of its "
                        "query heads (tensor_parallel.kv_shard)  tp.yaml:25 sharding.tensor.column")
    placements = {node.attr["name"]: dict(node.meta)["placement"] for node in compiled.graph.params()}
    assert placements["blocks.0.attention.wk"] == ("Replicate()",) and placements["blocks.0.attention.wq"] == ("Shard(0)",)
    sp = TP2.replace("  tensor: {axis: tp}\n", "  tensor:\n    axis: tp\n    sequence_parallel: true\n")
    sp_source = moec.compile_spec(moec.load_spec_text(dense_text(sp, kv_heads=1), file="tp.yaml")).source
    assert "k = F.linear(x_tp, tensor_parallel.kv_shard(self.wk, 1, partial=True))" in sp_source


def test_each_rank_reads_the_kv_head_of_its_query_heads():
    """GQA: query head h reads KV head h // (heads / kv_heads); rank r holds query heads
    [r * heads / tp, (r + 1) * heads / tp), all of which read kv_head_of(r, tp, kv_heads)."""
    checked = 0
    for heads, tp, kv_heads in [(4, 2, 1), (8, 4, 2), (8, 8, 2), (12, 4, 2), (16, 8, 4), (6, 6, 3), (8, 8, 1)]:
        per_rank = heads // tp
        for rank in range(tp):
            read = {h // (heads // kv_heads) for h in range(rank * per_rank, (rank + 1) * per_rank)}
            assert read == {kv_head_of(rank, tp, kv_heads)}, (heads, tp, kv_heads, rank)
            checked += 1
    assert checked == 2 + 4 + 8 + 4 + 8 + 6 + 8


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["split_kv", "replicated_kv"])
def test_the_tensor_parallel_program_runs_whole_on_one_process(kv_heads):
    spec_whole, spec_tp = (moec.load_spec_text(spec_text(mesh, kv_heads), file="tp.yaml") for mesh in ("", TP2))
    whole, split = build_model(spec_whole), build_model(spec_tp)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = whole(tokens), split(tokens)
    assert torch.equal(a.output, b.output) and torch.equal(a.aux_loss, b.aux_loss)


def test_a_moe_whose_experts_are_not_split_stays_whole():
    """Only attention and MLP split: the fused MoE keeps its experts (and shared experts, whose
    weights are also named w_up / w_down) whole, with no f or g inside."""
    mesh = TP2.replace("  tensor: {axis: tp}\n", "  tensor: {axis: tp, column: [attention.qkv, mlp.up], row: [attention.out, mlp.down]}\n")
    text = spec_text(mesh).replace("aux: {load_balance: 0.01", "shared_experts: {count: 1}\n          aux: {load_balance: 0.01")
    compiled = moec.compile_spec(moec.load_spec_text(text, file="tp.yaml"))
    moe = "\n".join(_method(compiled.source, "MoE"))
    assert "tensor_parallel" not in moe
    assert "grouped_linear(rows, self.experts.w_up, offsets)" in moe and "self.shared.w_up" in moe
    assert "split(block.mlp, {'w_up': 0, 'w_gate': 0, 'w_down': 1}, tp_mesh)" in compiled.parallel_source
    assert ".moe" not in compiled.parallel_source.split("def tensor_parallel")[1].split("\n\n\n")[0]


def test_the_vocabulary_split_lines_exactly():
    """embed and head split (Megatron's vocab-parallel embedding and head): the lookup in this rank's rows
    summed over tp, the head a column split whose logits stay split, parallel.py naming the axis."""
    compiled = program(TP2_VOCAB)
    assert _method(compiled.source, "TpGqaMoe", "embed_inputs")[1:] == [
        "        return tensor_parallel.embedding(tokens, tensor_parallel.local(self.embed.weight))"]
    assert _method(compiled.source, "TpGqaMoe", "predict")[1:] == [
        "        h = self.final_norm(x)",
        "        h_tp = tensor_parallel.copy(h)",
        "        return F.linear(h_tp, tensor_parallel.local(self.head.weight))",
    ]
    parallel = compiled.parallel_source
    assert "\nVOCAB_PARALLEL = 'tp'  # tp.yaml:27 sharding.tensor.column: the head's logits stay split along the vocabulary" in parallel
    assert "    split(model.embed, {'weight': 0}, tp_mesh)  # embed column  tp.yaml:27 sharding.tensor.column" in parallel
    assert "    split(model.head, {'weight': 0}, tp_mesh)  # head column  tp.yaml:27 sharding.tensor.column" in parallel
    assert "VOCAB_PARALLEL" not in program(TP2).parallel_source


def test_the_vocab_parallel_program_runs_whole_on_one_process():
    """Without a group the vocab-parallel lookup is F.embedding and the loss plain cross-entropy."""
    spec_whole, spec_tp = (moec.load_spec_text(spec_text(mesh), file="tp.yaml") for mesh in ("", TP2_VOCAB))
    whole, split = build_model(spec_whole), build_model(spec_tp)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    a, b = whole(tokens[:, :-1]), split(tokens[:, :-1])
    assert torch.equal(a.output, b.output)
    expected = torch.nn.functional.cross_entropy(a.output.flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.equal(tensor_parallel.cross_entropy(b.output, tokens[:, 1:]), expected)
