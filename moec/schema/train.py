"""The ``train`` section: the recipe that turns a model into a run."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, model_validator

from moec.schema.base import MAX_STEPS, Base, Dim, NonNegFloat, NonNegInt, PosFloat, PosInt, field_error

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]


class Optimizer(Base):
    """AdamW with optional per-group learning rates."""

    kind: Literal["adamw"] = "adamw"
    lr: LearningRate
    lr_router: LearningRate | None = Field(None, description="Default: lr.")
    lr_experts: LearningRate | None = Field(None, description="Default: lr.")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.95), strict=False
    )
    eps: PosFloat = 1e-8
    weight_decay: NonNegFloat = 0.1
    no_decay: list[Literal["norms", "biases", "embeddings", "router"]] = Field(
        default_factory=lambda: ["norms", "biases"], description="Parameter groups trained without weight decay."
    )


class LrSchedule(Base):
    """Linear warmup, then decay to ``min_lr_ratio * lr``."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


class TextData(Base):
    """Byte-level text from local files, split into train/validation by file."""

    kind: Literal["text"]
    files: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: ["stdlib:**/*.py"],
        description="Glob patterns; 'stdlib:' is the Python standard library's directory.",
    )
    val_fraction: Fraction = 0.05
    tokenizer: str = Field("bytes", description="'bytes' (one token per byte, vocab >= 256) or the path of a Hugging Face "
                           "tokenizer.json (model.inputs.vocab must hold its ids).")


class SignalsData(Base):
    """Synthetic 1-D geometric signals generated from the seed."""

    kind: Literal["signals"]
    patterns: Annotated[list[Literal["sine", "harmonics", "spiral"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["sine", "harmonics", "spiral"]
    )
    noise: NonNegFloat = 0.0
    val_fraction: Fraction = 0.1


class TrajectoriesData(Base):
    """Synthetic 3-D trajectories generated from the seed."""

    kind: Literal["trajectories"]
    patterns: Annotated[list[Literal["helix", "orbit", "lissajous", "lorenz"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["helix", "orbit", "lissajous", "lorenz"]
    )
    noise: NonNegFloat = 0.0
    val_fraction: Fraction = 0.1


class TokenFilesData(Base):
    """Pre-tokenized ids in flat binary files (nanoGPT's train.bin / val.bin), read a window at a time: any size,
    never read whole. Paths and globs are relative to the current directory."""

    kind: Literal["token_files"]
    train: Annotated[list[str], Field(min_length=1)] = Field(description="Files (or globs) of training token ids.")
    val: Annotated[list[str], Field(min_length=1)] = Field(description="Files (or globs) of validation token ids.")
    dtype: Literal["uint16", "uint32"] = Field("uint16", description="Width of one id in the files.")


class HfDatasetData(Base):
    """A text column of local Hugging Face dataset files (parquet, arrow, json / jsonl) read through `datasets`
    without network; used as text data (within the same byte budget, bytes or a tokenizer)."""

    kind: Literal["hf_dataset"]
    train: Annotated[list[str], Field(min_length=1)] = Field(description="Files (or globs) of the training rows.")
    val: Annotated[list[str], Field(min_length=1)] = Field(description="Files (or globs) of the validation rows.")
    text_field: Annotated[str, Field(min_length=1)] = Field("text", description="The column holding the text.")
    tokenizer: str = Field("bytes", description="As for text data: 'bytes' or the path of a tokenizer.json.")


class RandomTokensData(Base):
    """Uniform random tokens (benchmarks only: there is nothing to learn)."""

    kind: Literal["random_tokens"]


Data = Annotated[Union[TextData, TokenFilesData, HfDatasetData, SignalsData, TrajectoriesData, RandomTokensData],
                 Field(discriminator="kind")]


def _root_like(text: str) -> bool:
    import posixpath

    stripped = text.strip()
    if not stripped or "\x00" in stripped:
        return True
    norm = posixpath.normpath(stripped)
    return norm in (".", "..", "/", "//", "~") or norm.startswith("../") and set(norm.split("/")) <= {".."}


class CheckpointPolicy(Base):
    """When checkpoints are written and which are kept."""

    every: NonNegInt = Field(0, description="Steps between checkpoints; 0 (or more than train.steps): only at the end.")
    keep_last: PosInt = 3
    keep_best: bool | Annotated[int, Field(ge=0, le=1000)] = Field(
        True, description="Also keep the N checkpoints with the lowest validation loss (true: 1, false: 0).")
    dir: str | None = Field(None, description="Default: runs/<name>.")
    async_: bool = Field(False, alias="async", description="Write checkpoints in the background (DCP's async_save; pinned-memory "
                         "staging on CUDA): training waits only while the state is copied. manifest.json is written when the "
                         "write completes; at most one write is in flight; a signal or the end of training waits for it.")

    model_config = ConfigDict(**Base.model_config, serialize_by_alias=True)  # `async` is a Python keyword: the field is async_

    @model_validator(mode="after")
    def _dir_of_its_own(self):
        # A run writes metrics.jsonl, plots and checkpoints into this directory; "" or "." would
        # write them among unrelated files, "/" or "~" over a whole tree.
        if self.dir is not None and _root_like(self.dir):
            raise field_error("dir", f"{self.dir!r} is not a directory of its own; use e.g. runs/<name>")
        return self


StepNumber = Annotated[int, Field(ge=1, le=MAX_STEPS)]


class Profile(Base):
    """torch.profiler over steps ``start``..``end`` (numbered from 1 as in metrics.jsonl, both included) on every rank:
    a Chrome / Perfetto trace and a summary table per rank in ``<run>/profile``."""

    start: StepNumber
    end: StepNumber

    @model_validator(mode="after")
    def _ordered(self) -> "Profile":
        if self.end < self.start:
            raise field_error("end", f"must be >= start ({self.start}), got {self.end}")
        return self


class Eval(Base):
    """Held-out evaluation."""

    every: NonNegInt = Field(0, description="Steps between evaluations; 0 (or more than train.steps): only at the end.")
    batches: PosInt = 8


DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0


class Train(Base):
    """Seed, data, optimiser and schedule of a training run."""

    seed: Annotated[int, Field(ge=0, le=2**63 - 1)]
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)]
    batch: PosInt = Field(description="Global batch in sequences per optimizer step.")
    seq_len: Dim
    grad_accum: PosInt = 1
    optimizer: Optimizer
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule)
    grad_clip: PosFloat | None = Field(1.0, description="Max global grad norm; null disables clipping.")
    data: Data
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    eval: Eval = Field(default_factory=Eval)
    log: Annotated[list[Literal["jsonl", "tensorboard", "wandb"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["jsonl"], description="Where metrics go: 'jsonl' (metrics.jsonl, the run's record: "
        "plots and resume read it; always first), 'tensorboard' (<run>/tensorboard, needs the tensorboard package) and "
        "'wandb' (Weights & Biases offline, <run>/wandb; needs the wandb package; upload later with wandb sync).")
    profile: Profile | None = Field(None, description="Profile these steps (moec train --profile START:END overrides it); "
                                    "null: no profiling.")
    collective_timeout_s: Annotated[float, Field(gt=0, le=86400)] = Field(
        DEFAULT_COLLECTIVE_TIMEOUT_S, description="Multi-process runs: how long a rank waits for the others in a collective "
        "before the job fails (a dead or hung rank ends the job instead of hanging it).")

    @model_validator(mode="after")
    def _counts_fit(self) -> "Train":
        if self.lr_schedule.warmup_steps > self.steps:
            raise field_error("lr_schedule.warmup_steps", f"must be <= steps ({self.steps}), got {self.lr_schedule.warmup_steps}")
        if self.batch % self.grad_accum:
            raise field_error("grad_accum", f"must divide batch ({self.batch}), got {self.grad_accum}")
        if self.log[0] != "jsonl" or len(set(self.log)) != len(self.log):
            raise field_error("log", "must start with 'jsonl' (metrics.jsonl is the run's record) and name each logger once, "
                              f"got {self.log}")
        if self.profile is not None and self.profile.end > self.steps:
            raise field_error("profile.end", f"must be <= steps ({self.steps}), got {self.profile.end}")
        # checkpoint.every / eval.every beyond steps are not errors: the last step always evaluates and
        # saves, so `train.steps=20` on the command line runs a short trial without further edits.
        return self
