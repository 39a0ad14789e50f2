"""``moec inspect``: the moe_basics seed's layer report, its structure and numbers checked against
routing computed here from the same seeded input and weights."""

import re

import pytest
import torch
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.interop.weights import save_weights

runner = CliRunner()
SPEC = "specs/moe_basics_tiny.yaml"


def expected_report(layer: str, state: dict, tokens: int) -> list[str]:
    """The report from routing written out here: h ~ N(0, 1) seeded by train.seed, softmax top-2 of the router logits."""
    spec = moec.load_spec(SPEC)
    h = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(spec.train.seed))
    probs = torch.softmax(h[0] @ state[f"{layer}.router.weight"].T, dim=-1)
    counts = torch.bincount(torch.topk(probs, 2, dim=-1).indices.flatten(), minlength=8)
    balance = 0.02 * 8 * torch.sum(counts / tokens * probs.mean(0)).item()
    return [
        f"MoE Layer Configuration ({layer}):", "  - Hidden Dim: 64", "  - Expert FFN Dim: 128", "  - Num Experts: 8", "  - Top-k: 2",
        f"  - Batch Size: 1, Sequence Length: {tokens}", "", "Forward Pass:", f"  - Input: [1, {tokens}, 64]",
        f"  - Router Logits: [1, {tokens}, 8]", f"  - Expert Assignments: [1, {tokens}, 2]", f"  - Output: [1, {tokens}, 64]",
        "TIME", "", "Expert Load Distribution:",
        *[f"  Expert {e}: {c} tokens ({100 * c / tokens:.1f}%)" for e, c in enumerate(counts.tolist())],
        f"  Load Balance Loss: {balance:.4f} (aux.load_balance 0.02)",
    ]


def report_lines(*args: str) -> list[str]:
    result = runner.invoke(app, ["inspect", SPEC, *args])
    assert result.exit_code == 0, result.output
    lines = result.output.rstrip("\n").split("\n")
    assert re.fullmatch(r"  - Time: \d+\.\dms", lines[12]), lines[12]
    return lines[:12] + ["TIME"] + lines[13:]


def test_inspect_prints_the_seed_report_for_the_first_moe_layer():
    state = moec.reference_model(moec.load_spec(SPEC)).state_dict()
    assert report_lines("--tokens", "64") == expected_report("blocks.0.moe", state, 64)


def test_inspect_reads_a_checkpoint_and_another_layer(tmp_path):
    state = {name: value.clone() for name, value in moec.reference_model(moec.load_spec(SPEC)).state_dict().items()}
    state["blocks.1.moe.router.weight"][3] += 0.5  # expert 3 takes more tokens
    path = save_weights(state, tmp_path / "weights")
    lines = report_lines("--layer", "blocks.1.moe", "--tokens", "96", "--checkpoint", str(path))
    assert lines == expected_report("blocks.1.moe", state, 96)
    assert lines != report_lines("--layer", "blocks.1.moe", "--tokens", "96")


@pytest.mark.parametrize("args, message", [
    (["--layer", "blocks.9.moe"], "error: no MoE layer 'blocks.9.moe'; the layers are blocks.0.moe, blocks.1.moe"),
    (["--tokens", "200"], "error: --tokens 200 must be at most train.seq_len (128) or a multiple of it"),
])
def test_inspect_refuses_in_one_line(args, message):
    result = runner.invoke(app, ["inspect", SPEC, *args])
    assert result.exit_code == 1 and result.output.strip() == message
