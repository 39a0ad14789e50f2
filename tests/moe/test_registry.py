"""The MoE home: registries agree with the schema, each name lives in one table, and lowering,
fusion and the reference share one decomposition."""

import ast
import typing
from pathlib import Path

import pytest

import moec
from moec.ir import VerifyError
from moec.ir.ops import OPS
from moec.moe import ACTIVATIONS, ROUTERS, MoeAttrs, RouterAttrs, ExpertAttrs, moe_slots
from moec.passes import run_pipeline
from moec.passes.fuse_moe import fuse_moe
from moec.passes.pipeline import _check_removed, passes_for
from moec.layers import fields
from moec.layers.moe import spec as moe_spec
from tests.conftest import REPO
from tests.passes.helpers import MOE, spec_with


def test_schema_literals_name_exactly_the_registry_entries():
    assert set(typing.get_args(fields.Activation)) == set(ACTIVATIONS)
    assert set(fields.GATED_ACTIVATIONS) == {name for name, kind in ACTIVATIONS.items() if kind.gated}
    assert set(typing.get_args(moe_spec.RouterKind)) == set(ROUTERS)


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_router_kinds_and_activations_are_named_only_in_the_registries_and_the_schema():
    """Outside moec/moe (the tables), moec/schema and the layer kinds' spec models (the literals:
    moec/layers/fields.py, moec/layers/<kind>/spec.py), no code names a router kind or activation.

    'topk' and 'sinkhorn' are also primitive IR ops (moec.ir.ops), which the IR, the pipeline and the
    reference kernels name as ops; those two are left out here. moec/interop translates other
    frameworks' configs (HF ``hidden_act: silu``) into these names, so it names them too.
    """
    names = (set(ROUTERS) | set(ACTIVATIONS)) - set(OPS)
    found = {}
    for path in sorted((REPO / "moec").rglob("*.py")):
        if path.relative_to(REPO / "moec").parts[0] in ("moe", "schema", "interop"):  # interop/families/ included
            continue
        if path.parts[-3:-1] == ("moec", "layers") and path.name == "fields.py" or path.parts[-3] == "layers" and path.name == "spec.py":
            continue
        hits = names & _string_constants(path)
        if hits:
            found[str(path.relative_to(REPO))] = sorted(hits)
    assert found == {}


def test_slots_follow_the_router_and_activation_entries():
    attrs = MoeAttrs(experts=4, top_k=2, router=RouterAttrs(kind="sigmoid_bias"), expert=ExpertAttrs(activation="geglu", bias=True),
                     shared=True)
    assert moe_slots(attrs) == ("router.weight", "router.selection_bias", "experts.w_gate_up", "experts.w_down",
                                "experts.b_gate_up", "experts.b_down", "shared.w_up", "shared.w_gate", "shared.w_down")
    assert MoeAttrs(experts=8, top_k=2, router=RouterAttrs(kind="expert_choice"), expert=ExpertAttrs("gelu")).choices == 8


def test_fusion_accepts_only_what_decompose_writes():
    """An unfused MoE whose recorded attributes disagree with its nodes is not fused, and the stage rule says so."""
    graph = run_pipeline(spec_with(MOE), disable=("fuse_moe",)).unfused
    root = next(node for node in graph.nodes if "moe" in node.meta_dict)
    attrs = root.meta_dict["moe"]
    drifted = MoeAttrs(**{**attrs.__dict__, "router": RouterAttrs(**{**attrs.router.__dict__, "temperature": 2.0})})
    nodes = [node.with_(meta={**node.meta_dict, "moe": drifted}) if node is root else node for node in graph.nodes]
    unchanged, changed = fuse_moe(graph.with_nodes(nodes))
    assert not changed
    fuse = next(p for p in passes_for(None) if p.name == "fuse_moe")
    with pytest.raises(VerifyError, match="after fuse_moe: combine, dispatch, expert_ffn, topk nodes remain"):
        _check_removed(fuse, unchanged)
    assert fuse_moe(graph)[1]  # the faithful record fuses


def test_disabling_fuse_moe_skips_fuse_spectral_which_requires_it():
    spec = moec.load_spec("specs/spectral_moe.yaml")
    log = {record.name: record.skipped for record in run_pipeline(spec, disable=("fuse_moe",)).log}
    assert log["fuse_moe"] and log["fuse_spectral"] and not log["cse"]


def test_names_are_counted_per_op():
    graph = run_pipeline(moec.load_spec("specs/token_routed_tiny.yaml")).graph
    assert [node.name for node in graph.nodes if node.op == "moe"] == ["moe_0", "moe_1"]
    assert [node.name for node in graph.nodes if node.op == "attention"] == ["attention_0", "attention_1"]
