"""The form of the generated model.py: a model a person would write, not a trace of the graph."""

import ast
import re

import pytest

import moec
from moec.compile import build_model, compile_spec
from moec.ir.ops import OPS
from tests.conftest import REPO

SPECS = sorted((REPO / "specs").glob("*.yaml"))


def _source(path, *overrides) -> str:
    return compile_spec(moec.load_spec(path, overrides)).source


def _shape(source: str) -> str:
    """The program with its header comment and every number taken out: what is left is its structure."""
    code = "\n".join(line for line in source.splitlines() if not line.startswith("#"))
    return re.sub(r"\d+", "N", code)


def test_depth_changes_constants_only():
    """repeat: 2 and repeat: 64 give the same classes and the same statements: only numbers differ."""
    spec = REPO / "specs" / "token_routed_tiny.yaml"
    shallow, deep = _source(spec, "model.blocks[0].repeat=2"), _source(spec, "model.blocks[0].repeat=64")
    assert shallow != deep
    assert _shape(shallow) == _shape(deep)
    assert len(shallow.splitlines()) == len(deep.splitlines())
    assert "[Block(slot, device, dtype) for slot in range(0, 64)]" in deep


def test_the_120b_spec_is_a_short_program():
    source = compile_spec(moec.load_spec(REPO / "specs" / "gpt_oss_120b.yaml")).source
    classes = [node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef)]
    assert len(source.splitlines()) < 300
    assert classes == ["Attention", "FeedForward", "Block", "GptOss120b"]
    assert "for block in self.blocks:" in source


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_no_del_no_ssa_names_and_no_moec_imports(path):
    """Every bundled spec: no ``del`` statements, no ``<op>_<n>`` value names in any method; model.py, parallel.py and
    model_support.py import torch and each other, never moec (distributed builds included; the one lazy import of moec's
    Triton GEMM on CUDA, inside a try, falls back to torch where moec is absent)."""
    program = compile_spec(moec.load_spec(path))
    for name, text in (("model.py", program.source), ("parallel.py", program.parallel_source),
                       ("model_support.py", program.support_source)):
        imported = [node for node in ast.parse(text).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        modules = [alias.name for node in imported if isinstance(node, ast.Import) for alias in node.names]
        modules += [node.module for node in imported if isinstance(node, ast.ImportFrom)]
        assert not [m for m in modules if m.split(".")[0] == "moec"], f"{path.name} {name}: {modules}"
    tree = ast.parse(program.source)
    ssa = re.compile(rf"^({'|'.join(sorted(OPS, key=len, reverse=True))})_\d+$")
    for node in ast.walk(tree):
        assert not isinstance(node, ast.Delete), f"{path.name}: del at line {node.lineno}"
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assert not ssa.match(node.id), f"{path.name}: value {node.id} at line {node.lineno}"


BLOCK_MOEC = """
import sys


class NoMoec:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("moec", "cli"):
            raise ImportError(f"{name} must not be imported by a build directory")


sys.meta_path.insert(0, NoMoec())
sys.path.insert(0, sys.argv[1])
import torch
import model

saved = torch.load(sys.argv[2], weights_only=True)
net = model.Model()
net.load_state_dict(saved["state"])
out = net(saved["tokens"])
print(float((out.output - saved["output"]).abs().max()), float((out.aux_loss - saved["aux"]).abs()))
"""


def test_a_build_directory_runs_without_moec(tmp_path):
    """model.py and model_support.py, copied elsewhere, import torch only and compute what build_model computes."""
    import subprocess
    import sys

    import torch

    spec = moec.load_spec(REPO / "specs" / "token_routed_tiny.yaml")
    program = compile_spec(spec)
    build = tmp_path / "copied_build"
    build.mkdir()
    (build / "model.py").write_text(program.source)
    (build / "model_support.py").write_text(program.support_source)
    net = build_model(spec, program=program)
    (tokens,) = net.example_inputs(batch=2, seq=16)
    out = net(tokens)
    torch.save({"state": net.state_dict(), "tokens": tokens, "output": out.output.detach(), "aux": out.aux_loss.detach()},
               tmp_path / "saved.pt")
    script = tmp_path / "run.py"
    script.write_text(BLOCK_MOEC)
    result = subprocess.run([sys.executable, str(script), str(build), str(tmp_path / "saved.pt")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    output_diff, aux_diff = map(float, result.stdout.split())
    assert output_diff <= 1e-6 and aux_diff <= 1e-6
