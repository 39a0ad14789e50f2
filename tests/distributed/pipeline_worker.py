"""One rank of a pipeline-parallel training run (run by torch.distributed.run from test_pipeline.py).

``python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distributed.pipeline_worker SCHEDULE OUT``:
5 AdamW steps of ``SPEC`` with 4 microbatches; the last stage writes its per-step losses to OUT.
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moec
from moec.backends.parallel.pipeline import PipelineStage, build_schedule
from moec.compile import build_model
from moec.passes.stages import stage_split
from tests.runtime.helpers import quick_text

STEPS, MICROBATCHES, BATCH, SEQ, VOCAB = 5, 4, 8, 32, 256


def spec_text(pipeline: str = "") -> str:
    """quick_text's MoE model with 4 blocks (aux loss on); ``pipeline``: the mesh and sharding lines."""
    return quick_text(steps=STEPS, every=10).replace("repeat: 2", "repeat: 4").replace("schedule:\n", pipeline + "schedule:\n")


def pipelined(schedule: str) -> str:
    return spec_text(f"mesh: {{world_size: 2, axes: {{pp: 2}}}}\nsharding: {{pipeline: {{axis: pp, microbatches: {MICROBATCHES}, "
                     f"schedule: {schedule}}}}}\n")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(output, targets: torch.Tensor) -> torch.Tensor:
    logits, aux_rows = output  # aux_rows[0]: the sum of the blocks' aux losses (moec.backends.parallel.pipeline)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1)) + aux_rows[0]


def main(schedule: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    spec = moec.load_spec_text(pipelined(schedule), file="pipeline.yaml")
    program = moec.compile_spec(spec)
    model = build_model(spec, program=program).train()  # every rank builds (and seeds) the whole model, then keeps its stage
    split = [tuple(row["blocks"]) for row in program.manifest["pipeline_stages"]]
    if schedule == "interleaved_1f1b":  # two virtual stages per rank: stage r and r + ranks
        split = list(stage_split(spec, program.graph, 2 * ranks))
    mine = [PipelineStage(model, program.graph, *split[i]) for i in range(rank, len(split), ranks)]
    pipe = build_schedule(mine, ranks, rank, dist.group.WORLD, torch.device("cpu"), schedule, MICROBATCHES, loss_fn)
    optimizer = torch.optim.AdamW([p for stage in mine for p in stage.parameters()], lr=1e-3)
    losses = []
    for step in range(STEPS):
        inputs, targets = batch(step)
        per_micro: list[torch.Tensor] = []
        if rank == 0:
            pipe.step(inputs, target=targets, losses=per_micro)  # rank 0 holds the first stage (and, interleaved, another)
        else:
            pipe.step(target=targets, losses=per_micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if per_micro:
            losses.append(sum(loss.item() for loss in per_micro) / MICROBATCHES)
    if any(stage.is_last for stage in mine):
        with open(out, "w") as handle:
            json.dump({"losses": losses, "split": split}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
