"""``moec generate``, ``moec eval`` and ``moec serve``: use a trained run (moec.serve does the work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

SOURCE_HELP = "A run directory (its newest checkpoint that verifies) or one checkpoint directory."


def _load(source: Path, served: bool = False):
    """(model, spec), or with ``served`` (model, spec, codec) of a run, a checkpoint or an imported spec file."""
    from moec.checkpoint.dcp import CheckpointError
    from moec.schema import SpecError
    from moec.serve.load import load_served, load_trained

    try:
        return load_served(source) if served else load_trained(source)
    except (CheckpointError, SpecError, ValueError) as err:  # ValueError: an imported spec's damaged weights file
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def generate(
    source: Path = typer.Argument(..., help=SOURCE_HELP, show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue (token ids for models without text data)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", min=0, help="Tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, show_default=False,
                                                help="Sampling temperature; 0 is greedy. [default: 1, 0 with --speculative]"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens; 0: all."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling: the smallest set reaching this probability."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler: same seed, same output."),
    steps: int = typer.Option(64, "--steps", min=1, help="Continuous models: values to roll out."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Continuous models: the rollout PNG (default RUN/rollout.png)."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Run the decode path eagerly (no torch.compile)."),
    speculative: bool = typer.Option(False, "--speculative", help="Greedy self-speculative decoding: the head.mtp modules "
                                     "draft, the model verifies; prints the acceptance rate and tokens/s at the end."),
) -> None:
    """Continue a prompt (token models, streamed to stdout) or roll out a continuous model (PNG + MSE)."""
    model, spec = _load(source)
    if spec.model.inputs.kind != "tokens":
        _rollout(model, spec, steps, output or _run_dir(source) / "rollout.png")
        return
    from moec.serve.codec import codec_for
    from moec.serve.generate import Generator
    from moec.serve.sampling import Sampling

    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-file", param_hint="--prompt")
    text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8")
    if speculative and temperature not in (None, 0):
        typer.echo(f"error: --speculative is greedy only: drop --temperature {temperature:g} or give --temperature 0", err=True)
        raise typer.Exit(2)
    generator = Generator(model, spec, compile=not no_compile)
    if speculative:
        _refuse_speculation(generator)
    elif not generator.cached:
        typer.echo(f"note: no KV cache for this model ({generator.uncached_reason}): every token recomputes the window", err=True)
    codec = codec_for(spec)
    try:
        ids = codec.encode(text)
        generator.check_prompt(ids)
        default = 0.0 if speculative else 1.0
        sampling = Sampling(default if temperature is None else temperature, top_k, top_p if top_p > 0 else 1.0)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if speculative:
        _stream_speculative(generator, codec, ids, max_new_tokens)
        return
    decode = codec.decoder()
    for token in generator.stream(ids, max_new_tokens, sampling, seed):
        typer.echo(decode(token), nl=False)
    typer.echo("")


def _refuse_speculation(generator) -> None:
    """Exit 1 with one line when the model cannot draft (no head.mtp) or verify (no KV cache)."""
    from moec.serve.speculative import speculation_refusal

    refusal = speculation_refusal(generator)
    if refusal:
        typer.echo(f"error: --speculative: {refusal}", err=True)
        raise typer.Exit(1)


def _stream_speculative(generator, codec, ids: list[int], max_new_tokens: int) -> None:
    """Stream the greedy continuation drafted by the MTP modules; its acceptance rate and speed go to stderr."""
    import time

    from moec.serve.speculative import SpeculationStats, speculative_stream

    stats, decode = SpeculationStats(), codec.decoder()
    started, produced = time.perf_counter(), 0
    for token in speculative_stream(generator, ids, max_new_tokens, stats):
        typer.echo(decode(token), nl=False)
        produced += 1
    elapsed = time.perf_counter() - started
    typer.echo("")
    typer.echo(f"speculative: acceptance {stats.acceptance:.3f} ({stats.accepted} of {stats.drafted} drafted tokens), "
               f"{produced} tokens from {stats.rounds + 1} forwards of the model (the prompt's included), "
               f"{produced / elapsed:.1f} tokens/s", err=True)


def _run_dir(source: Path) -> Path:
    return source.parent.parent if source.parent.name == "checkpoints" else source


def _rollout(model, spec, steps: int, png: Path) -> None:
    from moec.serve.generate import plot_rollout, rollout

    if steps >= spec.model.max_seq_len:
        typer.echo(f"error: --steps {steps}: at most model.max_seq_len - 1 = {spec.model.max_seq_len - 1}", err=True)
        raise typer.Exit(1)
    result = rollout(model, spec, steps)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_rollout(result, png, spec.name)
    typer.echo(f"rollout of {steps} values after {result.context.shape[0]} held-out ones: MSE {result.mse:.6g}")
    typer.echo(f"wrote {png}")


def evaluate(
    source: Path = typer.Argument(..., help=SOURCE_HELP, show_default=False),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Text files or globs to evaluate on (default: the run's validation split)."),
    batches: Optional[int] = typer.Option(None, "--batches", min=1, help="Validation batches (default: train.eval.batches)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Validation loss and bits per byte (token models) or MSE (continuous models) of a trained run."""
    from moec.serve.evaluate import evaluate as run_eval
    from moec.serve.evaluate import run_validation_loss

    model, spec = _load(source)
    try:
        row = run_eval(model, spec, data, batches)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    row = {"checkpoint": str(model.checkpoint.path), "step": model.checkpoint.step, **row}
    if not data and batches is None:
        row["run_val_loss"] = run_validation_loss(model.checkpoint)
    if as_json:
        typer.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"moec eval {spec.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in row.items():
        table.add_row(key, f"{value:.6f}" if isinstance(value, float) else str(value))
    Console().print(table)


def serve(
    source: Path = typer.Argument(..., help=SOURCE_HELP + " Or the spec file of moec import hf (weights and tokenizer "
                                  "beside it).", show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535),
    slots: int = typer.Option(8, "--slots", min=1, help="Requests decoded together in one batched step."),
    queue: int = typer.Option(64, "--queue", min=1, help="Requests that may wait for a slot; more get 503."),
    prefix_cache_tokens: int = typer.Option(8192, "--prefix-cache-tokens", min=0, help="Prompt tokens whose KV the LRU prefix cache keeps."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Run the decode path eagerly (no torch.compile)."),
    speculative: bool = typer.Option(False, "--speculative", help="One request at a time; greedy ones without "
                                     "log-probabilities are drafted by the head.mtp modules and verified by the model."),
) -> None:
    """Serve generation over HTTP: the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), POST /generate,
    GET /health, GET /stats."""
    try:
        import uvicorn

        from moec.serve.server import create_app
    except ImportError as err:
        typer.echo(f"error: moec serve needs the [serve] extra (pip install 'moec[serve]'): {err}", err=True)
        raise typer.Exit(1) from None
    from moec.serve.engine import Engine
    from moec.serve.generate import Generator

    model, spec, codec = _load(source, served=True)
    if spec.model.inputs.kind != "tokens":
        typer.echo(f"error: {spec.name} takes continuous inputs: moec serve serves token models (roll it out with "
                   "moec generate --steps)", err=True)
        raise typer.Exit(1)
    generator = Generator(model, spec, compile=not no_compile)
    if speculative:
        _refuse_speculation(generator)
        typer.echo("note: --speculative serves one request at a time (--slots is 1); sampled requests and those asking "
                   "for log-probabilities decode as without it", err=True)
    elif not generator.cached:
        typer.echo(f"note: no KV cache for this model ({generator.uncached_reason}): requests run one at a time, "
                   "recomputing the window per token", err=True)
    engine = Engine(generator, slots=slots, queue_limit=queue, prefix_cache_tokens=prefix_cache_tokens, speculative=speculative)
    try:
        uvicorn.run(create_app(engine, codec, spec, model.checkpoint), host=host, port=port, log_level="warning")
    finally:
        engine.stop()
