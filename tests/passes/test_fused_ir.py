"""Every bundled spec lowers, fuses and verifies; its printed fused IR is a snapshot."""

import pytest

import moec
from moec.ir import print_graph
from moec.passes import run_pipeline
from tests.conftest import SPEC_FILES


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_fused_ir(path, snapshot):
    spec = moec.load_spec(path.relative_to(path.parent.parent))
    compiled = run_pipeline(spec)  # verifies after every pass
    graph = compiled.graph
    moe_layers = sum(block.repeat for block in spec.model.blocks for layer in block.layers if layer.kind == "moe")
    mtp = getattr(spec.model.head, "mtp", None)  # each MTP module holds a copy of the last block
    moe_layers += mtp.depth * sum(layer.kind == "moe" for layer in spec.model.blocks[-1].layers) if mtp else 0
    spectral_layers = sum(block.repeat for block in spec.model.blocks for layer in block.layers if layer.kind == "spectral_moe")
    assert sum(node.op == "moe" for node in graph.nodes) == moe_layers
    assert sum(node.op == "spectral_moe" for node in graph.nodes) == spectral_layers
    assert not {"topk", "dispatch", "expert_ffn", "combine", "rfft", "irfft"} & {node.op for node in graph.nodes}
    assert print_graph(graph) == snapshot
