"""``moec train``: the training loop, everything from the spec's ``train`` and ``schedule``.

Step ``s`` reads batches ``s * grad_accum + i`` (i < grad_accum) of the dataset, so the data
position is the step. Checkpoints hold the weights, AdamW state, RNG, step and spec; a run
resumed from step N continues bit for bit as if it had not stopped (on the CPU, with
``schedule.deterministic``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moec.bench.kernel_choice import choose_moe_kernels, default_device
from moec.checkpoint import compile_cache
from moec.checkpoint import dcp as ckpt
from moec.checkpoint.rundir import RunDirError, checked_run_dir, claim_on_rank0, write_run_spec
from moec.compile import build_model, compile_spec, parallel_module
from moec.data.datasets import last_value_baseline
from moec.data.kinds import make_dataset
from moec.distributed.processes import LaunchError, init_distributed, timed_out
from moec.dtypes import autocast
from moec.moe import ROUTERS, SELECTION_BIAS
from moec.observe.loggers import run_loggers
from moec.observe.memory import MemorySnapshots, step_memory
from moec.observe.metrics import (NO_METRICS, MetricsWriter, steady_tokens_per_s)
from moec.observe.profile import StepProfiler
from moec.observe.step_time import StepClock
from moec.train.annealing import anneal_buffers
from moec.train.diagnose import describe_nonfinite
from moec.train.errors import Aborted, TrainingError
from moec.train.fit import check_fit
from moec.train.optim import make_optimizer
from moec.train.vocab_loss import cross_entropy, loss_context
from moec.train.pipeline_step import PipelineError, make_pipeline, pipeline_axis
from moec.train.precision import apply_accumulation, float8_model
from moec.train.resume import check_init_from, check_spec, find_checkpoint
from moec.train.saving import RunCheckpoints
from moec.train.step import train_step
from moec.train.stopping import StopRequest
from moec.train.validation import validation_losses, validation_row

@dataclass
class RunResult:
    run_dir: Path
    step: int
    interrupted: str | None = None
    final_train_loss: float = math.nan
    best_val: float = math.nan
    baseline_mse: float | None = None
    last_eval: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_s: float = 0.0  # after the first step when it compiled (see compile_s)
    first_step_s: float = 0.0
    compile_s: float | None = None  # the first step's seconds when torch.compile ran in it
    plots: list = field(default_factory=list)
    profile: object = None  # the StepProfiler of a --profile run (its summary and trace path)


class Trainer:
    def __init__(self, spec, run_dir: Path | None = None, resume: str | None = None, allow_spec_change: bool = False,
                 device: str | None = None, display=None, init_from: Path | None = None, allow_data_change: bool = False,
                 overwrite: bool = False, profile: tuple[int, int] | None = None, memory_snapshot: int | None = None):
        self.spec, self.train = spec, spec.train
        window = profile or (spec.train.profile and (spec.train.profile.start, spec.train.profile.end))
        if window and window[1] > spec.train.steps:
            raise TrainingError(f"--profile {window[0]}:{window[1]}: the run has {spec.train.steps} steps")
        self.profile_window = window
        self.run_dir = checked_run_dir(spec.train.checkpoint.dir if run_dir is None else run_dir)
        if init_from is not None and resume is None:
            check_init_from(Path(init_from))
        # kernels.moe auto: timed here once per device and shape (single process), then read from the table
        self.kernel_choice = choose_moe_kernels(spec, device or default_device(), log=display.log if display else None)
        self.program = compile_spec(spec, kernel_choice=self.kernel_choice)
        try:
            self.parallel = parallel_module(self.program)  # the generated parallel.py, loaded once
            self.dist = init_distributed(spec, self.parallel, device, spec.train.collective_timeout_s)
        except LaunchError as err:
            raise TrainingError(str(err)) from None
        self.device = self.dist.device
        try:
            self.snapshots = MemorySnapshots(self.run_dir, self.dist.rank, self.device, memory_snapshot)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.run_lock = self._claim_run_dir(resume is not None, overwrite, display)
        self.expert_parallel = hasattr(self.parallel, "EXPERT_PLACEMENT")
        vocab_axis = getattr(self.parallel, "VOCAB_PARALLEL", None)  # the head's logits split along the vocabulary
        self.vocab_mesh = self.dist.mesh[vocab_axis] if vocab_axis and self.dist.distributed else None
        self.mtp = getattr(spec.model.head, "mtp", None)  # multi-token prediction: its loss joins the training loss
        self.display = display if self.dist.is_main else None
        if self.display and self.kernel_choice.worth_saying:
            self.display.log(self.kernel_choice.line())
        self.stop = StopRequest()
        torch.manual_seed(self.train.seed)
        torch.use_deterministic_algorithms(spec.schedule.deterministic)  # both ways: an earlier run in this process may have set it
        apply_accumulation(spec.schedule.precision)
        too_big = check_fit(spec, self.program.manifest, self.device, self.dist.dp_size)
        if too_big:
            raise TrainingError(too_big)
        # a pipeline rank builds the model on the meta device and allocates its own stages only (pipeline_step)
        on_meta = pipeline_axis(spec) is not None and self.dist.distributed and init_from is None
        self.model = build_model(spec, device="meta" if on_meta else self.device, program=self.program).train()
        if init_from is not None and resume is None:  # weights only (moec import hf, or another run's checkpoint)
            self._init_from(Path(init_from))
        if hasattr(self.parallel, "float8_training"):  # compute: fp8, before AC, compile and FSDP (torchtitan's order)
            try:
                self.model = float8_model(self.parallel, self.model, self.device, self.display and self.display.log)
            except ValueError as err:
                raise TrainingError(str(err)) from None
        try:  # sharding.pipeline over more than one rank: this rank keeps its stage(s) (moec.train.pipeline_step)
            self.pipeline = make_pipeline(spec, self.program, self.model, self.dist, self.parallel)
        except PipelineError as err:
            raise TrainingError(str(err)) from None
        if self.pipeline is not None and self.display:
            for line in self.pipeline.describe():
                self.display.log(line)
        self.step_fn = self._compiled(self.model)
        self.optimizer = make_optimizer(self.model, self.program.graph, spec)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # fp16 compute: dynamic loss scaling; a step whose gradients overflow is skipped (counted in metrics)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=spec.schedule.precision.compute == "fp16")
        self.skipped_steps = 0
        self.annealed = anneal_buffers(self.model, self.program)  # MoE settings annealed over the steps
        self.data = make_dataset(spec)
        self.token_model = spec.model.inputs.kind == "tokens"
        self.per_position = spec.model.head.pool == "none"  # a target per position (else one per row: head.pool 'last')
        buffers = dict(self.model.named_buffers())
        self.selection_biases = {layer: (buffers[f"{layer}.{SELECTION_BIAS}"], moe.router.bias_update_rate)
                                 for layer, moe in self.program.moe_layers() if ROUTERS[moe.router.kind].selection_bias
                                 and f"{layer}.{SELECTION_BIAS}" in buffers  # under a pipeline: this rank's layers
                                 and moe.router.bias_update_rate > 0}  # at 0 the update is a no-op
        self.checkpoints = RunCheckpoints(self.run_dir, self.train.checkpoint, self.dist)
        self.clock = StepClock()  # the step-time breakdown of each train row
        self.start_step, self.best_val, self.best_step = 0, math.inf, None
        self.val_at: dict[int, float] = {}  # validation loss per evaluated step (checkpoint.keep_best)
        if resume is not None:
            self._resume(resume, allow_spec_change, allow_data_change)
        truncate = self.start_step if resume else None
        if self.dist.is_main:
            write_run_spec(self.run_dir, spec, self.program.manifest["spec"]["overrides"])
        self.metrics = (run_loggers(MetricsWriter(self.run_dir / "metrics.jsonl", truncate_after=truncate), list(self.train.log),
                                    self.run_dir, spec) if self.dist.is_main else NO_METRICS)
        for note in getattr(self.metrics, "skipped", ()):
            if self.display:
                self.display.log(note)

    # --- setup -----------------------------------------------------------------------------

    def _compiled(self, model):
        """torch.compile per the spec: the whole model, or under data parallelism each block's forward
        (FSDP2's hooks run around the compiled blocks), then the generated parallel plan."""
        options = self.spec.schedule.compile
        if options.enabled:
            compile_cache.load(self.program.source)  # a second start of this program skips Inductor's codegen
        compile_ = compile_cache.compiler(options)
        self.parallel.checkpoint_activations(model)  # schedule.activation_checkpointing, before compile (torchtitan's order)
        if self.pipeline is not None:
            self.model = self.pipeline.parallelize(compile_ if options.enabled else None, self.task_loss,
                                                   lambda: loss_context(self.vocab_mesh))
            return self.model
        if not self.dist.distributed:
            return compile_cache.compiled_for_training(model, options, self.program.source) if options.enabled else model
        if options.enabled:
            # Under expert parallelism the all-to-all's split sizes are host integers: the exchange stays
            # out of the graph, so the blocks compile in pieces around it (fullgraph would refuse).
            expert_parallel = self.expert_parallel
            for block in model.blocks:
                block.forward = compile_(block.forward, **({"fullgraph": False} if expert_parallel else {}))
        self.model = self.parallel.parallelize(model, self.dist.mesh)
        return self.model

    def _claim_run_dir(self, resume: bool, overwrite: bool, display):
        """The run directory's lock and fresh-run rule (moec.checkpoint.rundir), decided on rank 0 for all ranks."""
        try:
            lock = claim_on_rank0(self.run_dir, resume, overwrite, self.dist)
        except RunDirError as err:
            raise TrainingError(str(err)) from None
        if lock is not None and lock.note and display is not None:
            display.log(lock.note)
        return lock

    def _init_from(self, path: Path) -> None:
        if path.is_dir():
            ckpt.load_model_state(path, self.model)
        else:
            from moec.interop.weights import load_weights

            load_weights(self.model, path)

    def _resume(self, resume: str, allow_spec_change: bool, allow_data_change: bool) -> None:
        ckpt.remove_partial(self.run_dir)
        info = find_checkpoint(self.run_dir, resume, self.display.log if self.display else None)
        check_spec(info.meta, self.spec, self.program.manifest["spec"]["overrides"], allow_spec_change)
        saved_data = info.manifest.get("data_fingerprint")
        if saved_data != self.data.fingerprint and not allow_data_change:
            raise TrainingError(f"cannot resume from {info.path}: the training data changed since the checkpoint (fingerprint "
                                f"{str(saved_data)[:12]} -> {self.data.fingerprint[:12]}); pass --allow-data-change to accept")
        try:
            ckpt.load_checkpoint(info.path, self.model, self.optimizer)
        except ckpt.CheckpointError as err:
            raise TrainingError(f"cannot resume: {err}") from None
        self.start_step = info.step
        if self.scaler.is_enabled() and "grad_scaler" in info.meta:
            scaler_state = dict(info.meta["grad_scaler"])
            self.skipped_steps = scaler_state.pop("skipped_steps", 0)
            self.scaler.load_state_dict(scaler_state)
        # meta.json stores "no validation yet" as null (JSON has no infinity)
        best = info.meta.get("best_val")
        self.best_val, self.best_step = (math.inf if best is None else best), info.meta.get("best_step")
        self.val_at = {int(step): val for step, val in info.meta.get("val_at", {}).items()}
        self.resumed_from = info.path

    # --- the loop --------------------------------------------------------------------------

    def run(self, stop_at: int | None = None) -> RunResult:
        """Train to train.steps, or stop with a checkpoint after step ``stop_at`` (the schedule is unchanged)."""
        result = RunResult(run_dir=self.run_dir, step=self.start_step)
        if not self.token_model:
            result.baseline_mse = last_value_baseline(self.data, self.train.eval.batches, self.train.batch)
        started, tokens_seen = time.perf_counter(), 0
        self.stop = StopRequest()
        profiler = result.profile = self._profiler()
        self.snapshots.start()
        self.clock = StepClock()
        with self.stop.handlers(self._aborted), self._collective_timeouts(result), profiler, \
                (self.display.progress(self) if self.display else contextlib.nullcontext()) as bar:
            for step in range(self.start_step, self.train.steps):
                if stop_at is not None and step + 1 == stop_at:
                    self.stop.plan()
                row = self._timed_step(step)
                if step == self.start_step:  # this process's first step: under torch.compile it compiles
                    self._save_compile_cache()
                    result.first_step_s = time.perf_counter() - started
                    row |= {"includes_compile": True} if self.spec.schedule.compile.enabled else {}
                tokens_seen += self.train.batch * self.train.seq_len
                result.final_train_loss, result.step = row["task_loss"], step + 1
                self.stop.poll(self.dist.distributed, self.device)  # every rank stops after the same step
                try:
                    self.metrics.write(row)
                    if self._due(self.train.eval.every, step) and not self.stop.signalled:
                        result.last_eval = self._evaluate(step + 1, result) or result.last_eval
                    if self._due(self.train.checkpoint.every, step) or self.stop.reason:
                        self._save(step + 1)
                    self._written(self.checkpoints.poll())
                except OSError as err:  # a full disk or a run directory gone read-only: stop cleanly
                    raise TrainingError(self._write_failed(err)) from None
                if bar is not None:
                    bar.update(row, result.last_eval)
                with self.clock.part("profiler"):
                    profiler.step()
                self._snapshot_after(step + 1)
                if self.stop.reason:
                    result.interrupted = self.stop.reason
                    break
            self._wait_for_checkpoint()  # inside the signal handlers: a second SIGINT stops the wait
        self._save_compile_cache()  # again: evaluation compiled the model in eval mode too
        result.seconds = time.perf_counter() - started
        result.tokens_per_s = steady_tokens_per_s(result, tokens_seen, self.train.batch * self.train.seq_len,
                                                  self.spec.schedule.compile.enabled)
        result.best_val = self.best_val
        self.metrics.close()
        if self.run_lock is not None:  # the run is over: another may use the directory (plots need no lock)
            self.run_lock.release()
        return result

    @property
    def stop_signal(self) -> str | None:
        """The signal (or ``--stop-at``) this run stopped on."""
        return self.stop.reason or self.stop.pending

    def _profiler(self) -> StepProfiler:
        """torch.profiler over --profile's steps (or train.profile's); inactive without a window."""
        window = self.profile_window or (0, -1)
        return StepProfiler(window, self.start_step, self.run_dir, self.dist.rank, self.device, self._profiled)

    def _profiled(self, profiler: StepProfiler) -> None:
        if self.display:
            self.display.profile(profiler, self.spec.name)

    def _timed_step(self, step: int) -> dict:
        """The step's row with its time breakdown and memory; an out-of-memory error is one line naming the snapshot."""
        try:
            row = self._train_step(step)
        except torch.OutOfMemoryError as err:
            raise TrainingError(f"out of memory in step {step + 1} ({str(err).splitlines()[0]}); "
                                f"{self.snapshots.on_out_of_memory(step + 1)}; {self.last_checkpoint()}") from None
        return row | {"time_s": self.clock.row(), "memory": step_memory(self.device)}

    def _snapshot_after(self, step: int) -> None:
        path = self.snapshots.after_step(step)
        if path is not None and self.display:
            self.display.log(f"memory snapshot {path} (open it in PyTorch's memory_viz)")

    def _written(self, path: Path | None) -> None:
        """A background checkpoint write completed."""
        if path is not None and self.display:
            self.display.log(f"checkpoint {path} written")

    def _wait_for_checkpoint(self) -> None:
        try:
            self._written(self.checkpoints.wait())
        except OSError as err:
            raise TrainingError(self._write_failed(err)) from None

    def _due(self, every: int, step: int) -> bool:
        last = step + 1 == self.train.steps
        return last or (every > 0 and (step + 1) % every == 0)

    def _save_compile_cache(self) -> None:
        if self.spec.schedule.compile.enabled and self.dist.is_main:
            compile_cache.save(self.program.source)

    def _train_step(self, step: int) -> dict:
        if self.pipeline is not None:
            with self.clock.part("forward_backward"):  # the schedule's step, optimizer included
                return self.pipeline.train_step(self, step)
        return train_step(self, step)

    def optimizer_step(self) -> None:
        """optimizer.step(), through the fp16 GradScaler: it skips the step when a gradient is inf / NaN and
        lowers the scale (a lower scale after update() is how a skipped step shows)."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.skipped_steps += 1

    def autocast(self):
        """The forward's autocast (``schedule.precision.compute``) on this rank's device."""
        return autocast(self.spec.schedule.precision.compute, self.device.type)

    def task_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.token_model:
            return cross_entropy(output, targets, self.vocab_mesh)
        return F.mse_loss(output.float(), targets)

    def diverged_message(self, step: int, loss: torch.Tensor, inputs: torch.Tensor) -> str:
        where = describe_nonfinite(self.program, self.model, inputs, self.train.seed)
        return f"loss is {loss.item()} at step {step + 1}: {where}; {self.last_checkpoint('good')}"

    def last_checkpoint(self, what: str = "complete") -> str:
        found = ckpt.list_checkpoints(self.run_dir)
        return f"the last {what} checkpoint is {found[-1].path} (step {found[-1].step})" if found else "no checkpoint was written yet"

    def _write_failed(self, err: OSError) -> str:
        where = err.filename or self.run_dir
        if err.errno in ckpt.NO_SPACE:
            return f"no space left on the device writing {where}; {self.last_checkpoint()}"
        return f"cannot write {where}: {err.strerror or err}; {self.last_checkpoint()}"

    def update_selection_bias(self, health: dict) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts."""
        for layer, (bias, rate) in self.selection_biases.items():
            load = torch.tensor(health[layer]["utilization"], device=self.device)
            bias.add_(rate * torch.sign(1.0 / load.numel() - load))

    @torch.no_grad()
    def _evaluate(self, step: int, result: RunResult) -> dict | None:
        """The validation row, or None when a signal arrived mid-way (a partial mean is not written)."""
        with self.clock.part("eval"):
            return self._validation(step, result)

    def _validation(self, step: int, result: RunResult) -> dict | None:
        losses = validation_losses(self)
        if losses is None:
            return None
        val = self.dist.mean(sum(losses) / len(losses))
        row = validation_row(step, val, self.token_model, self.data.bytes_per_token, result.baseline_mse)
        if math.isfinite(val):
            self.val_at[step] = val
        if val < self.best_val:
            self.best_val, self.best_step = val, step
        self.metrics.write(row)
        if self.display:
            self.display.log_eval(row)
        return row

    def _save(self, step: int) -> None:
        meta = {"spec": self.spec.model_dump(mode="json"), "spec_sha256": self.program.manifest["spec"]["sha256"],
                "overrides": self.program.manifest["spec"]["overrides"],
                "data_position": step, "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "best_step": self.best_step, "lrs": [g["lr"] for g in self.optimizer.param_groups],
                "val_at": {str(s): v for s, v in self.val_at.items()}}
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict() | {"skipped_steps": self.skipped_steps}
        with self.clock.part("checkpoint"):  # the stall: the whole write, or (async) staging the state
            path, writing = self.checkpoints.save(step, self.model, self.optimizer, meta, self.data.fingerprint, self.val_at)
        if self.display:
            self.display.log(f"checkpoint {path}" + (" (writing in the background)" if writing else ""))

    @contextlib.contextmanager
    def _collective_timeouts(self, result: RunResult):
        """A rank that died or hangs leaves the others waiting in a collective: one line, not gloo's traceback."""
        try:
            yield
        except RuntimeError as err:
            if not (self.dist.distributed and timed_out(err)):
                raise
            raise TrainingError(f"a collective did not finish within train.collective_timeout_s "
                                f"({self.train.collective_timeout_s:g} s) after step {result.step}: another rank died or "
                                f"hangs; {self.last_checkpoint()}") from None

    def _aborted(self, name: str) -> Aborted:
        return Aborted(f"stopped by a second {name} without saving; {self.last_checkpoint()}")
