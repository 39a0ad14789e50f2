"""The tensor-parallel forms of a generated model.py and parallel.py, byte for byte, and what they do on one process.

A spec whose tensor-parallel axis has size 1 gets exactly the program of the spec without one. With tp > 1,
parallel.py splits the projections with torch's plans, so model.py differs from the one-process program only
where no plan reaches: head counts read off the local widths, and the MoE's expert GEMMs on local slices
between Megatron's f and g (``moec.backends.torch.tp_support``, copied into model_support.py). The same file
still runs whole on one process (plain weights: the helpers are the identity).
"""

import pytest
import torch

import moec
from moec.backends.torch.tp_support import kv_head_of
from moec.compile import build_model
from moec.train.vocab_loss import cross_entropy
from tests.distributed.tp_worker import TP2, TP2_VOCAB, spec_text, tied


def program(mesh: str = "", kv_heads: int = 2, text: str | None = None):
    return moec.compile_spec(moec.load_spec_text(text or spec_text(mesh, kv_heads), file="tp.yaml"))


def body(source: str) -> str:
    return source.split("SPEC_NAME = ")[1]  # after the header (its spec sha256 line differs)


def _method(source: str, cls: str, method: str = "forward") -> list[str]:
    """The statements of ``cls.method`` without their trailing comments."""
    text = source.split(f"\nclass {cls}(nn.Module):\n")[1].split(f"    def {method}(")[1].split("\n\n")[0]
    return [line.split("  # ")[0] for line in text.splitlines()[1:]]


def _plan(parallel_source: str) -> list[str]:
    """The lines of parallel.py's tensor_parallel body after its docstring, without trailing comments."""
    text = parallel_source.split("def tensor_parallel(")[1].split("\n\n\n")[0]
    return [line.split("  # ")[0] for line in text.splitlines()[5:]]


def test_a_tensor_axis_of_size_one_changes_nothing():
    whole = program()
    one = program("mesh: {world_size: 2, axes: {dp: 2, tp: 1}}\nsharding:\n  batch: [dp]\n  tensor: {axis: tp}\n")
    assert body(one.source) == body(whole.source) and one.support_source == whole.support_source
    assert "def tensor_parallel" not in one.parallel_source and "parallelize_module" not in one.parallel_source


def test_model_py_differs_from_one_process_only_where_no_plan_reaches():
    source, whole = program(TP2).source, program().source
    assert "# Tensor parallel over tp (2): shapes are the whole model's; a rank holds 1/2 of each split group (parallel.py).\n" in source
    assert not any("moec" in line for line in source.splitlines() if line.startswith(("import ", "from ")))
    assert _method(source, "Attention")[1:5] == [
        "        q = self.wq(x)",
        "        k = self.wk(x)",
        "        v = self.wv(x)",
        "        q = rope(q, q.shape[-1] // 8, 8, 10000.0, positions)",
    ]
    assert _method(source, "Attention")[-1] == _method(whole, "Attention")[-1] == "        return self.wo(attn)"
    assert _method(source, "FeedForward") == _method(whole, "FeedForward")
    moe = _method(source, "MoE")
    assert "            rows = copy_to_shards(x, self.experts.w_gate_up)[order // 2]" in moe  # inside `with phase(...)`
    # each rank's slice of both halves [E, 2, H / tp, D]: one GEMM, then the GLU on the rank's own columns
    assert "            gate_up = grouped_linear(rows, local(self.experts.w_gate_up).flatten(1, 2), offsets)" in moe
    down = moe.index("            y_sorted = grouped_linear(hidden, local(self.experts.w_down), offsets)")
    assert moe[down + 1] == "            y_sorted = sum_over_shards(y_sorted, self.experts.w_down)"


def test_a_replicated_kv_head_stays_whole_and_each_rank_keeps_its_head():
    """1 KV head for 2 ranks: parallel.py keeps wk and wv whole with moec's ReplicatedKvHead (copied into
    model_support.py), and model.py reads them as on one process."""
    compiled = program(TP2, kv_heads=1)
    assert _method(compiled.source, "Attention")[2:4] == ["        k = self.wk(x)", "        v = self.wv(x)"]
    assert _plan(compiled.parallel_source)[:6] == [
        "    for block in model.blocks:",
        "        parallelize_module(block, tp_mesh, {",
        "            'attention.wq': ColwiseParallel(),",
        "            'attention.wk': ReplicatedKvHead(1),",
        "            'attention.wv': ReplicatedKvHead(1),",
        "            'attention.wo': RowwiseParallel(),",
    ]
    assert "from model_support import ExpertHiddenSplit, ReplicatedKvHead" in compiled.parallel_source
    assert "\nclass ReplicatedKvHead(ParallelStyle):\n" in compiled.support_source
    assert "\ndef kv_head_of(rank: int, ranks: int, kv_heads: int) -> int:\n" in compiled.support_source
    placements = {node.attr["name"]: dict(node.meta)["placement"] for node in compiled.graph.params()}
    assert placements["blocks.0.attention.wk.weight"] == ("Replicate()",)
    assert placements["blocks.0.attention.wq.weight"] == ("Shard(0)",)


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
    """Only attention and MLP split: the fused MoE keeps its experts (and shared experts) whole, with no f or g."""
    mesh = TP2.replace("  tensor: {axis: tp}\n", "  tensor: {axis: tp, column: [attention.qkv, mlp.up], row: [attention.out, mlp.down]}\n")
    text = spec_text(mesh).replace("aux: {load_balance: 0.01", "shared_experts: {count: 1}\n          aux: {load_balance: 0.01")
    compiled = moec.compile_spec(moec.load_spec_text(text, file="tp.yaml"))
    moe = "\n".join(_method(compiled.source, "MoE"))
    assert "shards" not in moe and "local(" not in moe
    assert "grouped_linear(rows, self.experts.w_gate_up.flatten(1, 2), offsets)" in moe and "self.shared.w_up" in moe
    plan = _plan(compiled.parallel_source)
    assert "            'mlp.w_up': ColwiseParallel()," in plan and not any("moe" in line for line in plan)
    assert "model_support" not in compiled.parallel_source  # no style of moec's own is needed


def test_the_vocabulary_split_lines_exactly():
    """embed and head split (Megatron's vocab-parallel embedding and head) by torch's plans: model.py reads them as on
    one process; a head tied to the split embedding reads its local rows after f."""
    compiled = program(TP2_VOCAB)
    assert _method(compiled.source, "TpGqaMoe", "embed_inputs")[1:] == ["        return self.embed(tokens)"]
    assert _method(compiled.source, "TpGqaMoe", "predict")[1:] == ["        return self.head(self.final_norm(x))"]
    plan = _plan(compiled.parallel_source)
    assert plan[plan.index("    parallelize_module(model, tp_mesh, {"):] == [
        "    parallelize_module(model, tp_mesh, {",
        "        'embed': RowwiseParallel(input_layouts=Replicate()),",
        "        'head': ColwiseParallel(),",
        "    })",
        "  ",  # a comment: RowwiseParallel hands on the lookups' sum un-waited, which a compiled block cannot take
        "  ",
        "    model.embed.register_forward_hook(lambda _module, _inputs, summed: summed.clone())",
    ]
    assert "\nVOCAB_PARALLEL = 'tp'  # tp.yaml:27 sharding.tensor.column: the head's logits stay split along the vocabulary" \
        in compiled.parallel_source
    assert "VOCAB_PARALLEL" not in program(TP2).parallel_source
    tied_head = program(text=tied(spec_text(TP2_VOCAB)))
    assert _method(tied_head.source, "TpGqaMoe", "predict")[1:] == [
        "        return F.linear(copy_to_shards(self.final_norm(x), self.embed.weight), local(self.embed.weight))"]


def test_the_vocab_parallel_program_runs_whole_on_one_process():
    """On plain weights the helpers are the identity and the loss plain cross-entropy."""
    spec_whole, spec_tp = (moec.load_spec_text(spec_text(mesh), file="tp.yaml") for mesh in ("", TP2_VOCAB))
    whole, split = build_model(spec_whole), build_model(spec_tp)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    a, b = whole(tokens[:, :-1]), split(tokens[:, :-1])
    assert torch.equal(a.output, b.output)
    expected = torch.nn.functional.cross_entropy(a.output.flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.equal(cross_entropy(b.output, tokens[:, 1:]), expected)
