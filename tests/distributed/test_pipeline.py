"""Pipeline parallelism (moec.backends.parallel.pipeline) on 2 CPU processes against one process.

The workers (pipeline_worker.py) cut the generated model into 2 stages (PIPELINE_STAGES; 4 virtual
stages for interleaved 1F1B) and train
5 steps of 4 microbatches with torch.distributed.pipelining; the reference runs the whole model on
the same 4 microbatches per step (each microbatch's load-balance loss covers its own rows, as in the
pipeline), scaling each microbatch's loss by 1/4 as the schedules scale the gradients.
"""

import json
import sys

import pytest
import torch

import moec
from moec.backends.parallel.pipeline import PipelineStage, pipeline_problem
from moec.compile import build_model
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.distributed.pipeline_worker import MICROBATCHES, STEPS, batch, loss_fn, pipelined, spec_text


@pytest.fixture(scope="module")
def single() -> list[float]:
    spec = moec.load_spec_text(spec_text(), file="single.yaml")
    model = build_model(spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        inputs, targets = batch(step)
        total = 0.0
        for x, y in zip(inputs.chunk(MICROBATCHES), targets.chunk(MICROBATCHES)):
            out = model(x)
            loss = loss_fn((out.output, out.aux_loss.reshape(1)), y)
            (loss / MICROBATCHES).backward()
            total += loss.item() / MICROBATCHES
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def run_pipeline(tmp_path, schedule: str) -> dict:
    out = tmp_path / f"{schedule}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.distributed.pipeline_worker", schedule, str(out)]
    done = run_job(command, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["interleaved_1f1b"])  # gpipe and 1f1b: through moec train, test_pipeline_training.py
def test_two_stages_give_the_single_process_losses(schedule, single, tmp_path):
    result = run_pipeline(tmp_path, schedule)
    # interleaved: 4 virtual stages, rank 0 runs blocks 0 and 2, rank 1 blocks 1 and 3
    assert result["split"] == ([[0, 0], [1, 1], [2, 2], [3, 3]] if schedule == "interleaved_1f1b" else [[0, 1], [2, 3]])
    print(schedule, max(abs(a - b) for a, b in zip(result["losses"], single)))
    assert len(result["losses"]) == STEPS and result["losses"] == pytest.approx(single, abs=1e-5)


def test_stages_chained_in_one_process_are_the_model():
    spec = moec.load_spec_text(pipelined("gpipe"), file="pipeline.yaml")
    program = moec.compile_spec(spec)
    assert pipeline_problem(program.graph) is None
    model = build_model(spec, program=program).train()
    tokens = batch(0)[0]
    whole = model(tokens)
    first, second = (PipelineStage(model, program.graph, *row["blocks"]) for row in program.manifest["pipeline_stages"])
    hidden, aux_rows = first(tokens)
    output, aux_rows = second(hidden, aux_rows)
    assert torch.equal(output, whole.output) and torch.equal(aux_rows, whole.aux_loss.repeat(tokens.shape[0]))
    # each stage names its tensors as the whole model does, and together they are the whole model's state
    assert {name for name, _ in first.named_parameters()} == {"blocks.0." + n for n, _ in model.blocks[0].named_parameters()} | {
        "blocks.1." + n for n, _ in model.blocks[1].named_parameters()} | {"embed.weight"}
    assert {name for name, _ in second.named_parameters() if not name.startswith("blocks.")} == {"final_norm.weight", "head.weight"}
    assert set(first.state_dict()) | set(second.state_dict()) == set(model.state_dict())
    assert not set(first.state_dict()) & set(second.state_dict())


def test_tied_embeddings_are_not_pipelined():
    text = pipelined("gpipe").replace("head: {kind: lm}", "head: {kind: lm, tie_embeddings: true}")
    program = moec.compile_spec(moec.load_spec_text(text, file="tied.yaml"))
    assert pipeline_problem(program.graph) == "the first and the last stage share embed.weight (model.head.tie_embeddings)"
