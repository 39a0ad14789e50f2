"""The generated program as a program: readable, deterministic, safe, debuggable."""

import ast
import json
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import moec
from moec.backends.torch import runtime, snippets
from moec.backends.torch.loader import load_program
from moec.compile import compile_spec
from tests.conftest import REPO
from tests.passes.helpers import MOE, spec_with


@pytest.mark.parametrize("name", ["token_routed_tiny", "spectral_moe"])
def test_model_py_snapshot(name, snapshot):
    source = compile_spec(moec.load_spec(f"specs/{name}.yaml")).source
    # The torch version is part of the provenance header; keep the snapshot portable.
    assert source.replace(torch.__version__, "<torch>") == snapshot


def test_two_builds_in_two_processes_are_byte_identical(tmp_path):
    moec_script = Path(sys.executable).parent / "moec"
    for out in ("a", "b"):
        subprocess.run([str(moec_script), "build", "specs/signals_sinkhorn.yaml", "-o", str(tmp_path / out)],
                       cwd=REPO, check=True, capture_output=True)
    for name in ("model.py", "ir.txt", "graph.dot"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / out / "manifest.json").read_text()) for out in ("a", "b")]
    for manifest in manifests:  # pass timings are measurements; everything else is fixed
        for record in manifest["passes"]:
            record.pop("ms")
    assert manifests[0] == manifests[1]


EVIL = "x'); __import__('pathlib').Path('PWNED').touch(); ('\"\"\" # "


def test_spec_strings_never_become_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = spec_with(MOE, name="plain").source.text.replace("version: 1", "version: 1\ndescription: plain")
    plain = moec.load_spec_text(text, file="spec.yaml")
    evil = moec.load_spec_text(text.replace("name: plain", f"name: {json.dumps(EVIL)}").replace(
        "description: plain", f"description: {json.dumps(EVIL + chr(10) * 2 + 'import os')}"), file="spec.yaml")
    assert evil.name == EVIL
    source, reference = compile_spec(evil).source, compile_spec(plain).source
    tree = ast.parse(source)
    names = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value == EVIL]
    assert names == [EVIL]  # exactly one occurrence, as the SPEC_NAME string literal
    differing = [(a, b) for a, b in zip(source.splitlines(), reference.splitlines()) if a != b]
    assert len(source.splitlines()) == len(reference.splitlines())
    # Only the provenance line, the name literal and the class name differ.
    assert [b.split(" = ")[0].split("(")[0].split(",")[0] for _, b in differing] == [
        "# spec 'plain'", "SPEC_NAME", "class Plain", "Model"]
    model = moec.build_model(evil)
    model(*model.example_inputs(batch=1, seq=4))
    assert not (tmp_path / "PWNED").exists()


def test_a_traceback_from_generated_code_points_into_model_py(tmp_path):
    spec = moec.load_spec("specs/token_routed_tiny.yaml")
    program = compile_spec(spec)
    module = load_program(program.source, tmp_path / "model.py", support=program.support_source)
    model = module.Model()
    with pytest.raises(Exception) as caught:
        model(torch.zeros(2, 8))  # float "tokens": F.embedding rejects them
    frames = traceback.extract_tb(caught.value.__traceback__)
    mine = [f for f in frames if f.filename == str((tmp_path / "model.py").resolve())]
    assert mine and mine[0].line == "x = self.embed_inputs(tokens)" and mine[-1].line == "return self.embed(tokens)"
    assert (tmp_path / "model.py").read_text() == compile_spec(spec).source


@pytest.mark.parametrize("seq", [7, 8, 16])
@pytest.mark.parametrize("norm", ["ortho", "backward", "forward"])
def test_dft_matmuls_agree_with_torch_fft(seq, norm):
    x = torch.randn(2, seq, 3, dtype=torch.float64)
    fft, dft = snippets.rfft_real(x, norm, False), snippets.rfft_real(x, norm, True)
    torch.testing.assert_close(dft, fft, rtol=1e-10, atol=1e-10)
    z = torch.randn_like(fft)  # arbitrary spectra: imag at DC / Nyquist must be ignored by both
    torch.testing.assert_close(snippets.irfft_real(z, seq, norm, True), snippets.irfft_real(z, seq, norm, False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("width, out_width", [(5, 4), (8, 12)], ids=["odd-widths-loop", "aligned-native"])
def test_fp32_grouped_linear_custom_op_matches_a_loop_in_value_and_gradient(width, out_width):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, width, generator=gen, requires_grad=True)
    w = torch.randn(3, out_width, width, generator=gen, requires_grad=True)  # [E, out, in]: the parameters' layout
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)  # expert 1 gets no rows
    out = runtime.grouped_linear(x, w, offsets)
    expected = torch.cat([x[:4] @ w[0].T, x[4:9] @ w[2].T])
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    ex, ew = torch.autograd.grad(expected, (x, w), grad)
    torch.testing.assert_close(gx, ex), torch.testing.assert_close(gw, ew)
    assert gw[1].abs().sum() == 0
    assert gw.stride() == w.stride()  # written in the weight's layout: AccumulateGrad keeps it without a copy
    xb, wb = torch.randn(9, 8, generator=gen), torch.randn(3, 8, 8, generator=gen)  # bf16 rows: 16-byte strides
    bf16 = runtime.grouped_linear(xb.bfloat16(), wb.bfloat16(), offsets)
    torch.testing.assert_close(bf16.float(), torch.cat([xb[:4] @ wb[0].T, xb[4:9] @ wb[2].T]), rtol=3e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 rows under bf16 autocast: the bf16 kernel
        assert runtime.grouped_linear(xb, wb, offsets).dtype == torch.bfloat16


def test_meta_build_of_the_120b_spec_allocates_nothing():
    model = moec.build_model(moec.load_spec("specs/gpt_oss_120b.yaml"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == model.program.manifest["parameters"]["total"] == 120_908_427_264
    memory = model.program.manifest["memory_per_device"]
    assert memory["mesh"] == {"tp": 8, "pp": 6, "dp": 4} and 35 < memory["total_gib"] < 45
