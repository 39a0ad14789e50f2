"""``moec build`` prints each expert-parallel rank's experts and how many move when ep grows by one."""

from typer.testing import CliRunner

from moec.cli.main import app
from tests.runtime.helpers import quick_text

EP4 = "mesh: {world_size: 4, axes: {ep: 4}}\nsharding: {batch: [ep], experts: [ep], placement: PLACEMENT}\n"


def build_output(tmp_path, placement: str) -> list[str]:
    spec = tmp_path / f"{placement}.yaml"
    text = quick_text().replace("schedule:\n", EP4.replace("PLACEMENT", placement) + "schedule:\n")
    spec.write_text(text.replace("experts: 4", "experts: 16"))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / placement)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("expert placement"))
    return lines[start:start + 6]


def test_build_prints_the_hashed_placement_and_the_moves(tmp_path):
    assert build_output(tmp_path, "consistent_hash") == [
        "expert placement (consistent_hash, 16 experts over ep 4):",
        "  rank 0: 6 8 10 12",
        "  rank 1: 2 4 13 14",
        "  rank 2: 1 7 11 15",
        "  rank 3: 0 3 5 9",
        "  ep 4 -> 5 moves 3 of 16 experts (contiguous would move 6)",
    ]
    assert build_output(tmp_path, "contiguous")[1:] == [
        "  rank 0: 0 1 2 3", "  rank 1: 4 5 6 7", "  rank 2: 8 9 10 11", "  rank 3: 12 13 14 15",
        "  ep 4 -> 5 moves 6 of 16 experts (consistent_hash would move 3)",
    ]
