"""Every field of ``mesh``, ``sharding`` and ``schedule`` changes what runs or is refused.

``AUDIT`` holds one check per leaf field; ``test_every_field_is_audited`` fails when a field is
added to the schema without one. A check either compares what a changed value generates or
sets against the base spec's, or expects a refusal: a validation error (``moec.SpecError`` with
its message) or, for what a spec may plan but moec does not execute yet, ``moec train``'s refusal
at launch (``UNSUPPORTED`` in the generated parallel.py).
Pipeline fields are checked on the pipeline run a rank would build (``moec.train.pipeline_step``)
with a stand-in mesh; tests/distributed/test_pipeline_training.py runs them on processes.
"""

import types
import typing

import pydantic
import pytest
import torch

import moec
from moec.bench.kernel_choice import ENV, not_measured_reason
from moec.checkpoint import compile_cache
from moec.compile import build_model, parallel_module
from moec.distributed.processes import LaunchError, init_distributed
from moec.schema.parallel import Mesh, Sharding
from moec.schema.schedule import Schedule
from moec.train.pipeline_step import PipelineRun
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text

BASE = quick_text(steps=2, every=10)
DDP = ("mesh.world_size=2", "mesh.axes={dp: 2}", "sharding.batch=[dp]")
FSDP = ("mesh.world_size=2", "mesh.axes={dp: 2}", "sharding.batch=[dp]", "sharding.fsdp=[dp]")
EP = ("mesh.world_size=2", "mesh.axes={ep: 2}", "sharding.batch=[ep]", "sharding.experts=[ep]")
TP = ("mesh.world_size=2", "mesh.axes={tp: 2}", "sharding.tensor={axis: tp}")
PP = ("mesh.world_size=2", "mesh.axes={pp: 2}", "sharding.pipeline={axis: pp, microbatches: 2}")
TRITON = ("schedule.kernels.moe=triton",)


def spec(*overrides):
    return moec.load_spec_text(BASE, file="audit.yaml", overrides=overrides)


def parallel_source(*overrides) -> str:
    return moec.compile_spec(spec(*overrides)).parallel_source


def model_source(*overrides) -> str:
    return moec.compile_spec(spec(*overrides)).source


def refused(message: str, *overrides) -> None:
    with pytest.raises(moec.SpecError) as caught:
        spec(*overrides)
    assert message in str(caught.value)


def refused_at_launch(monkeypatch, feature: str, *overrides) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(spec(*overrides).mesh.world_size))  # as torchrun --nproc-per-node N sets it
    program = moec.compile_spec(spec(*overrides))
    assert any(feature in item for item in parallel_module(program).UNSUPPORTED)
    with pytest.raises(LaunchError, match=feature):
        init_distributed(spec(*overrides), types.SimpleNamespace(UNSUPPORTED=parallel_module(program).UNSUPPORTED), None)


def contains(text: str, *lines: str) -> None:
    for line in lines:
        assert line in text


def differs(render, base: tuple, changed: tuple) -> None:
    assert render(*base) != render(*changed)


def compile_options(monkeypatch, *overrides) -> dict:
    """What the trainer passes to torch.compile for this spec."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    monkeypatch.setattr(compile_cache, "load", lambda source: None)
    s = spec(*overrides)
    program = moec.compile_spec(s)
    fake = types.SimpleNamespace(spec=s, program=program, parallel=parallel_module(program),
                                 dist=types.SimpleNamespace(distributed=False), pipeline=None)
    Trainer._compiled(fake, build_model(s, program=program))
    return calls[0] if calls else {}


class _Mesh:
    """A stand-in DeviceMesh: pipeline rank 0 of ``axes``, no process group (nothing is sent)."""

    def __init__(self, *axes: str):
        self.mesh_dim_names = axes

    def __getitem__(self, axis):
        return types.SimpleNamespace(get_group=lambda: None, get_local_rank=lambda: 0)


def pipeline_run(*overrides) -> PipelineRun:
    """What pipeline rank 0 of this spec builds: its stage(s), the split, the schedule's settings."""
    s = spec(*overrides)
    program = moec.compile_spec(s)
    ctx = types.SimpleNamespace(mesh=_Mesh(*s.mesh.axes), device=torch.device("cpu"), dp_rank=0, dp_size=1, cp_rank=0, cp_size=1,
                                distributed=True)
    return PipelineRun(s, program, build_model(s, program=program), ctx)


def pipeline_axis_acts(mp) -> None:
    assert not any("pipeline" in item for item in parallel_module(moec.compile_spec(spec(*PP))).UNSUPPORTED)
    # with tensor parallelism inside each stage too (tests/distributed/test_3d.py runs dp x pp x tp)
    pp_tp = ("mesh.world_size=4", "mesh.axes={pp: 2, tp: 2}", "sharding.pipeline={axis: pp, microbatches: 2}", "sharding.tensor={axis: tp}")
    assert parallel_module(moec.compile_spec(spec(*pp_tp))).UNSUPPORTED == ()
    run = pipeline_run(*PP)  # rank 0 keeps block 0 and the embeddings, not block 1, the final norm or the head
    assert list(run.part.blocks) == ["0"] and {name for name, _ in run.part.named_parameters()} >= {"embed.weight"}
    assert not any(name.startswith(("head.", "final_norm.")) for name, _ in run.part.named_parameters())
    refused("has size 1: nothing is pipelined", "mesh.world_size=1", "mesh.axes={pp: 1}", "sharding.pipeline={axis: pp}")
    # what the pipeline cannot compose with yet is refused at launch by name
    # with expert parallelism inside each stage (tests/distributed/test_pipeline_training.py runs pp x ep); not with FSDP
    pp_ep = ("mesh.world_size=4", "mesh.axes={pp: 2, ep: 2}", "sharding.pipeline={axis: pp, microbatches: 2}",
             "sharding.batch=[ep]", "sharding.experts=[ep]")
    assert parallel_module(moec.compile_spec(spec(*pp_ep))).UNSUPPORTED == ()
    refused_at_launch(mp, "pipeline parallelism with expert parallelism and FSDP", *pp_ep, "sharding.fsdp=[ep]")
    refused_at_launch(mp, "pipeline parallelism with fp16 compute", *PP, "schedule.precision.compute=fp16")


def pipeline_microbatches_act(mp) -> None:
    read = []
    data = types.SimpleNamespace(batch=lambda split, index, rows: read.append((index, rows)) or types.SimpleNamespace(
        inputs=torch.zeros(rows, 4), targets=torch.zeros(rows, 4)))
    for micro in (2, 4):
        run = pipeline_run(*PP, f"sharding.pipeline.microbatches={micro}")
        read.clear()
        inputs, _ = run.micro_batches(data, "train", 1, 8)  # step 1 reads batches 1 * M + m of 8 / M rows
        assert read == [(micro + m, 8 // micro) for m in range(micro)] and inputs.shape[0] == 8
        assert run.loss_divisor == micro
    refused("1f1b needs at least one microbatch per stage (2), got 1", *PP, "sharding.pipeline.microbatches=1")


def pipeline_schedule_acts(mp) -> None:
    from torch.distributed import pipelining

    built = []
    mp.setattr(pipelining, "PipelineStage", lambda stage, index, total, device, group: (index, total))
    for name in ("ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B"):
        mp.setattr(pipelining, name, lambda held, n_microbatches, name=name, **kw: built.append((name, held, n_microbatches)))
    four = ("model.blocks[0].repeat=4",)
    for kind in ("gpipe", "1f1b", "interleaved_1f1b"):
        pipeline_run(*PP, *four, f"sharding.pipeline.schedule={kind}").parallelize(None, None)
    assert built == [("ScheduleGPipe", (0, 2), 2), ("Schedule1F1B", (0, 2), 2),
                     ("ScheduleInterleaved1F1B", [(0, 4), (2, 4)], 2)]  # interleaved: stages 0 and 2 of 4 on rank 0
    refused("interleaved_1f1b runs 2 stages per rank, 4 in all, but the model has 2 block(s)", *PP,
            "sharding.pipeline.schedule=interleaved_1f1b")


def tensor_axis_acts(mp) -> None:
    differs(model_source, (), TP)
    contains(parallel_source(*TP), "tp_mesh = mesh['tp']", "    tensor_parallel(model, mesh)")
    # with expert parallelism (tests/distributed/test_tensor_parallel.py runs tp x ep): each expert's hidden size over
    # tp, the experts over ep, one 2-D DTensor; what that layout does not run yet is refused at launch by name
    tp_ep = ("mesh.world_size=4", "mesh.axes={ep: 2, tp: 2}", "sharding.batch=[ep]", "sharding.experts=[ep]",
             "sharding.tensor={axis: tp}")
    assert parallel_module(moec.compile_spec(spec(*tp_ep))).UNSUPPORTED == ()
    contains(parallel_source(*tp_ep), "    ep_mesh = mesh[('ep', 'tp')]", "EXPERT_TP_SPLITS = {'w_gate_up': 2, 'w_down': 2}")
    refused_at_launch(mp, "tensor parallelism with expert parallelism and FSDP", *tp_ep, "sharding.fsdp=[ep]")
    refused_at_launch(mp, "tensor parallelism with expert parallelism over an axis that does not split the batch",
                      *tp_ep, "sharding.batch=[]")
    refused_at_launch(mp, "tensor parallelism with expert parallelism and placement consistent_hash", *tp_ep,
                      "sharding.placement=consistent_hash")


def launched_world(*overrides) -> None:
    s = spec(*overrides)
    with pytest.raises(LaunchError, match="the spec's mesh has world_size 2, but 1 process"):
        init_distributed(s, parallel_module(moec.compile_spec(s)), None)


AUDIT = {
    "mesh.world_size": lambda mp: launched_world(*DDP),
    "mesh.axes": lambda mp: differs(parallel_source, DDP, ("mesh.world_size=2", "mesh.axes={dp: 1, fsdp: 2}",
                                                          "sharding.batch=[fsdp]")),
    "sharding.batch": lambda mp: contains(parallel_source(*DDP), "DATA_PARALLEL = ('dp',)",
                                          "replicate(model, device_mesh=dp_mesh)"),
    "sharding.sequence": lambda mp: contains(parallel_source("mesh.world_size=2", "mesh.axes={cp: 2}", "sharding.sequence=[cp]"),
                                             "CONTEXT_PARALLEL = ('cp',)", "use_context_parallel(model, mesh['cp'].get_group())"),
    "sharding.experts": lambda mp: differs(parallel_source, DDP, DDP + ("sharding.experts=[dp]",)),
    "sharding.fsdp": lambda mp: differs(parallel_source, DDP, FSDP),
    "sharding.placement": lambda mp: differs(parallel_source, EP, EP + ("sharding.placement=consistent_hash",)),
    "sharding.tensor.axis": tensor_axis_acts,
    "sharding.tensor.column": lambda mp: (
        differs(parallel_source, TP, TP + ("sharding.tensor.column=[attention.qkv]", "sharding.tensor.row=[attention.out]"))
        or contains(parallel_source(*TP, "sharding.tensor.column=[attention.qkv, mlp.up, experts.up, head]"),
                    "VOCAB_PARALLEL = 'tp'", "'head': ColwiseParallel(),")),
    "sharding.tensor.row": lambda mp: refused("experts.up is split but its pair is not", *TP, "sharding.tensor.row=[attention.out]"),
    "sharding.tensor.sequence_parallel": lambda mp: refused("is implemented for attention, mla and mlp layers only", *TP,
                                                            "sharding.tensor.sequence_parallel=true"),
    "sharding.pipeline.axis": pipeline_axis_acts,
    "sharding.pipeline.microbatches": pipeline_microbatches_act,
    "sharding.pipeline.schedule": pipeline_schedule_acts,
    "schedule.precision.params": lambda mp: (
        build_model(spec("schedule.precision.params=bf16")).embed.weight.dtype == torch.bfloat16 or pytest.fail("params")),
    "schedule.precision.compute": lambda mp: differs(parallel_source, FSDP, FSDP + ("schedule.precision.compute=bf16",)),
    "schedule.precision.accumulate": lambda mp: refused("bf16 accumulation cannot be requested",
                                                        "schedule.precision.compute=bf16", "schedule.precision.accumulate=bf16"),
    "schedule.precision.reduce": lambda mp: differs(parallel_source, FSDP, FSDP + ("schedule.precision.reduce=bf16",)),
    "schedule.compile.enabled": lambda mp: (compile_options(mp) == {} and compile_options(mp, "schedule.compile.enabled=true")
                                            or pytest.fail("compile.enabled")),
    "schedule.compile.mode": lambda mp: _compile_option(mp, "mode", "max-autotune", "max-autotune"),
    "schedule.compile.fullgraph": lambda mp: _compile_option(mp, "fullgraph", "false", False),
    "schedule.compile.dynamic": lambda mp: _compile_option(mp, "dynamic", "true", True),
    "schedule.compile.backend": lambda mp: _compile_option(mp, "backend", "aot_eager", "aot_eager"),
    "schedule.kernels.moe": lambda mp: differs(model_source, (), ("schedule.kernels.moe=eager",)),
    "schedule.kernels.spectral_moe": lambda mp: refused("but the model has no spectral_moe layer",
                                                        "schedule.kernels.spectral_moe=fft"),
    "schedule.kernels.measure": lambda mp: (mp.delenv(ENV, raising=False), differs(  # off: the fixed rule, not timed
        lambda *o: not_measured_reason(spec(*o), "cpu"), (), ("schedule.kernels.measure=false",))),
    "schedule.kernels.attention": lambda mp: differs(model_source, (), ("schedule.kernels.attention=eager",)),
    **{f"schedule.tiles.{name}": (lambda name, value: lambda mp: differs(
        model_source, TRITON + ("schedule.tiles={}",), TRITON + (f"schedule.tiles={{{name}: {value}}}",)))(name, value)
       for name, value in {"BM": 64, "BN": 64, "BK": 64, "warps": 8, "stages": 2}.items()},
    "schedule.activation_checkpointing.mode": lambda mp: differs(parallel_source, (), (
        "schedule.activation_checkpointing.mode=full",)),
    "schedule.activation_checkpointing.every": lambda mp: differs(parallel_source, (
        "schedule.activation_checkpointing.mode=full",), ("schedule.activation_checkpointing={mode: full, every: 2}",)),
    "schedule.deterministic": None,  # test_deterministic_and_accumulation_reach_torch: one Trainer for both
}


def _compile_option(monkeypatch, name: str, value: str, expected) -> None:
    options = compile_options(monkeypatch, "schedule.compile.enabled=true", f"schedule.compile.{name}={value}")
    assert options[name] == expected


def _leaves(model: type[pydantic.BaseModel], prefix: str) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, pydantic.BaseModel)]
        out |= _leaves(nested[0], f"{prefix}.{name}") if nested else {f"{prefix}.{name}"}
    return out


def test_every_field_is_audited():
    fields = _leaves(Mesh, "mesh") | _leaves(Sharding, "sharding") | _leaves(Schedule, "schedule")
    assert fields == set(AUDIT)


@pytest.mark.parametrize("field", sorted(name for name, check in AUDIT.items() if check is not None))
def test_field_acts_or_is_refused(field, monkeypatch):
    AUDIT[field](monkeypatch)


def test_deterministic_and_accumulation_reach_torch(tmp_path):
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # torch's default
    try:
        for deterministic in (False, True):
            Trainer(spec(f"schedule.deterministic={str(deterministic).lower()}"), run_dir=tmp_path / str(deterministic))
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction  # accumulate: fp32
            assert not torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    finally:
        torch.use_deterministic_algorithms(False)
