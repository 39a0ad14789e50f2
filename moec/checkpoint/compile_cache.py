"""torch.compile's caches kept beside the generated program, so a second start of the same
program skips Inductor's code generation even where its /tmp caches are gone (a new machine,
a CI runner, a cleaned /tmp).

After the first compiled step the trainer saves ``torch.compiler.save_cache_artifacts()``
(Inductor's FX-graph cache, AOTAutograd's cache, autotuning results: the "mega-cache") to
``$MOEC_CACHE_DIR/<program sha256>/torch-<version>.compile-cache``; the next start of the
same program (same source, same torch) loads it before compiling. Only Dynamo's trace of
the Python code runs again. Any failure is a cache miss: compiling from scratch is correct.

A single-process run goes one step further (:class:`AheadOfTime`): the training forward of each input
shape is compiled ahead of time and saved, so a second start runs no Dynamo trace either.
"""

from __future__ import annotations

import hashlib
import os
import sys
from functools import partial
from pathlib import Path

import torch

from moec.backends.torch.loader import cache_dir


def artifact_path(source: str) -> Path:
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    return cache_dir() / digest[:16] / f"torch-{torch.__version__}.compile-cache"


def load(source: str) -> bool:
    """Load the saved artifacts of this program into torch's caches; whether there were any."""
    path = artifact_path(source)
    try:
        blob = path.read_bytes()
    except OSError:
        return False
    try:
        return torch.compiler.load_cache_artifacts(blob) is not None
    except Exception:  # written by another build of torch, or damaged: compile from scratch
        return False


def save(source: str) -> Path | None:
    """Write what torch compiled so far in this process; None when there is nothing to save."""
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception:
        return None
    if saved is None:
        return None
    path = artifact_path(source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(saved[0])
        tmp.replace(path)
    except OSError:  # a read-only cache directory costs only the next start's compile time
        return None
    return path


def compiler(options):
    """``torch.compile`` with the spec's ``schedule.compile`` options."""
    return partial(torch.compile, mode=None if options.mode == "default" else options.mode, fullgraph=options.fullgraph,
                   dynamic=options.dynamic, backend=options.backend)


def compiled_for_training(model: torch.nn.Module, options, source: str):
    """The single-process training forward: compiled ahead of time where that applies (a fullgraph,
    default-mode Inductor compile with static shapes), else torch.compile's lazy module."""
    ahead = options.fullgraph and options.mode == "default" and options.backend == "inductor" and not options.dynamic
    compile_ = compiler(options)
    return AheadOfTime(model, compile_(model), source) if ahead else compile_(model)


class AheadOfTime:
    """The training forward compiled ahead of time for each input shape (torch's ``aot_compile``, marked
    experimental in torch 2.13) and saved beside the program, so that a second start skips Dynamo's
    trace as well as Inductor: it loads the compiled forward and backward and checks their guards.

    Used for a single-process, fullgraph, default-mode Inductor compile. Any input the saved function's
    guards refuse (another grad mode, autocast, thread count, deterministic flag, shape), and any failure
    to compile, save or load ahead of time, runs the ordinary lazily compiled model instead: correct,
    only slower to start.
    """

    def __init__(self, model: torch.nn.Module, compiled, source: str):
        self.model, self.compiled, self.source = model, compiled, source
        self.functions: dict[str, object] = {}  # input key -> the compiled function, or None where it failed

    def __call__(self, inputs: torch.Tensor):
        key = f"{'x'.join(map(str, inputs.shape))}-{str(inputs.dtype).removeprefix('torch.')}"
        if key not in self.functions:
            self.functions[key] = self._load(key) or self._compile(key, inputs)
        function = self.functions[key]
        if function is not None and function.guard_check(self.model, inputs):
            return function(self.model, inputs)
        return self.compiled(inputs)

    def _path(self, key: str) -> Path:
        return artifact_path(self.source).with_suffix(f".{key}.aot")

    def _load(self, key: str):
        try:
            blob = self._path(key).read_bytes()
        except OSError:
            return None
        try:
            from torch._dynamo.aot_compile import AOTCompiledFunction

            function = AOTCompiledFunction.deserialize(blob, f_globals=vars(sys.modules[type(self.model).__module__]))
        except Exception:  # written by another torch, or damaged: compile again
            return None
        function.disable_guard_check()  # __call__ checks them once, itself
        return function

    def _compile(self, key: str, inputs: torch.Tensor):
        try:
            function = self.compiled.forward.aot_compile(((inputs,), {}))
        except Exception:  # a program aot_compile cannot capture: the lazy compile handles it
            return None
        function.disable_guard_check()
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            function.save_compiled_function(str(path))
        except Exception:  # not serializable, or a read-only cache: only the next start is slower
            return function
        return function
