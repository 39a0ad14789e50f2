"""Self-speculative decoding with the MTP modules (``moec generate --speculative``): the same greedy tokens as plain
decoding, an acceptance rate counted independently of the cache, acceptance 1.0 once the MTP modules have learned a
repeating sequence, and the refusals of the CLI."""

import pytest
import torch
import yaml
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.serve.engine import Engine
from moec.serve.generate import Generator
from moec.serve.sampling import Sampling
from moec.serve.speculative import SpeculationStats, accepted_length, speculative_stream
from moec.train.mtp import mtp_loss, mtp_losses
from moec.train.trainer import Trainer
from tests.serve.test_engine_requests import run

PROMPTS = ([1, 2, 3, 4, 5], list(range(40, 77)))
NEW_TOKENS = 24


def tiny_spec(depth: int | None = 1, steps: int = 1):
    """specs/deepseek_v3_tiny.yaml with ``head.mtp`` of ``depth`` (None: without multi-token prediction)."""
    with open("specs/deepseek_v3_tiny.yaml", encoding="utf-8") as file:
        data = yaml.safe_load(file)
    if depth is None:
        del data["model"]["head"]["mtp"]
    else:
        data["model"]["head"]["mtp"] = {"depth": depth, "weight": 0.3}
    data["schedule"] = {"compile": {"enabled": False}}
    data["train"].update(steps=steps, lr_schedule={"warmup_steps": 0}, batch=2, seq_len=16,
                         data={"kind": "text", "files": ["stdlib:json/*.py"]},
                         checkpoint={"every": steps}, eval={"every": steps, "batches": 1})
    return moec.load_spec_text(yaml.safe_dump(data), file=f"deepseek_v3_tiny_mtp{depth}.yaml")


def tiny_generator(depth: int | None = 1, seed: int = 0) -> Generator:
    spec = tiny_spec(depth)
    torch.manual_seed(seed)
    return Generator(moec.build_model(spec), spec, compile=False)


def plain_greedy(generator: Generator, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    return list(generator.stream(prompt, new_tokens, Sampling(temperature=0.0)))


def independent_acceptance(generator: Generator, prompt: list[int], greedy: list[int]) -> tuple[int, int]:
    """(drafted, accepted) recounted without the cache: the hidden state from a full forward over the known tokens,
    the drafts checked against the plain greedy continuation."""
    model, depth = generator.model, generator.spec.model.head.mtp.depth
    sequence, known, drafted, accepted = prompt + greedy, len(prompt) + 1, 0, 0  # known: the prompt and the first token
    with torch.no_grad():
        while known < len(sequence):
            tokens = torch.tensor([sequence[:known]])
            hidden = model(tokens[:, :-1]).hidden
            room = min(depth, len(sequence) - known - 1)
            if room == 0:
                break
            drafts = model.draft(hidden, tokens)[0, :room].tolist()
            kept = accepted_length(drafts, sequence[known:known + room])
            drafted, accepted, known = drafted + room, accepted + kept, known + kept + 1
    return drafted, accepted


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_plain_greedy_and_its_acceptance_is_recounted(depth):
    generator = tiny_generator(depth)
    for prompt in PROMPTS:
        stats = SpeculationStats()
        greedy = plain_greedy(generator, prompt)
        assert list(speculative_stream(generator, prompt, NEW_TOKENS, stats)) == greedy
        assert 0.0 <= stats.acceptance <= 1.0
        assert stats.drafted > 0 and (stats.drafted, stats.accepted) == independent_acceptance(generator, prompt, greedy)


@pytest.mark.slow
def test_speculation_slides_the_window_as_plain_decoding_does():
    """Past model.max_seq_len the cache keeps the last half window, as plain decoding does, with the same tokens."""
    generator = tiny_generator(2)
    generator.window = 32
    prompt = list(range(100, 112))
    assert list(speculative_stream(generator, prompt, 28)) == plain_greedy(generator, prompt, 28)


def test_accepted_length_is_the_matching_prefix():
    assert accepted_length([], []) == 0
    assert accepted_length([3, 4, 5], [3, 4, 9]) == 2
    assert accepted_length([3, 4], [1, 4]) == 0
    assert accepted_length([3, 4], [3, 4]) == 2


def repeating_batch(period: list[int], batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of the repeating ``period`` starting at random phases: [batch, seq + 1]."""
    starts = torch.randint(0, len(period), (batch,), generator=generator)
    cycle = torch.tensor(period * ((seq + 1) // len(period) + 2))
    return torch.stack([cycle[start:start + seq + 1] for start in starts.tolist()])


def train_on_repetition(model, period: list[int], steps: int = 25) -> None:
    """The model and its MTP modules learn to continue ``period`` (main loss + the MTP loss, AdamW at a high rate)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        sequence = repeating_batch(period, 2, 16, generator)
        out = model(sequence[:, :-1])
        targets = sequence[:, 1:]
        loss = torch.nn.functional.cross_entropy(out.output.flatten(0, 1), targets.flatten())
        loss = loss + mtp_loss(mtp_losses(out.mtp_logits, targets), 0.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.slow
def test_after_learning_a_repeating_sequence_every_draft_is_accepted():
    generator = tiny_generator(2)
    period = [17, 200, 3, 99, 45, 120, 7, 250, 64, 31, 180]
    train_on_repetition(generator.model, period)
    prompt = period * 2
    stats = SpeculationStats()
    tokens = list(speculative_stream(generator, prompt, NEW_TOKENS, stats))
    assert tokens == (period * 4)[:NEW_TOKENS] == plain_greedy(generator, prompt)
    assert stats.acceptance == 1.0 and stats.rounds == NEW_TOKENS // 3  # 2 drafts + the model's token per forward


runner = CliRunner()


def test_generate_speculative_refusals_are_one_line(trained_run):
    """The serve tests' trained run has no head.mtp: exit 1; sampling with --speculative: exit 2."""
    run_dir, _ = trained_run
    no_mtp = runner.invoke(app, ["generate", str(run_dir), "--prompt", "x", "--speculative", "--no-compile"])
    assert no_mtp.exit_code == 1
    assert no_mtp.stderr.strip() == ("error: --speculative: speculative decoding drafts with the multi-token prediction "
                                     "modules, and the spec has no model.head.mtp")
    sampled = runner.invoke(app, ["generate", str(run_dir), "--prompt", "x", "--speculative", "--temperature", "0.7"])
    assert sampled.exit_code == 2
    assert sampled.stderr.strip() == "error: --speculative is greedy only: drop --temperature 0.7 or give --temperature 0"
    pytest.importorskip("uvicorn")
    served = runner.invoke(app, ["serve", str(run_dir), "--speculative", "--no-compile", "--port", "0"])
    assert served.exit_code == 1 and served.stderr.strip() == no_mtp.stderr.strip()


def test_the_speculative_engine_drafts_greedy_requests_and_samples_the_others():
    """Greedy requests: plain greedy tokens (a stop token still ends them); sampled ones: the plain engine's tokens."""
    generator = tiny_generator(1)
    prompt, sampled = PROMPTS[1], Sampling(temperature=0.8)
    tokens, expected_sampled = plain_greedy(generator, prompt, 12), list(generator.stream(prompt, 8, sampled, seed=3))
    engine = Engine(generator, slots=4, speculative=True)
    try:
        [(greedy, _), (stopped, request)] = run(engine, (prompt, 12, {}), (prompt, 12, {"stop_tokens": frozenset([tokens[3]])}))
        drawn, _ = run_sampled(engine, prompt, 8, sampled, 3)
        stats = engine.stats()
    finally:
        engine.stop()
    assert engine.slots == 1 and [item.token for item in greedy] == tokens
    assert [item.token for item in stopped] == tokens[:tokens.index(tokens[3])] and request.finish_reason == "stop"
    assert [item.token for item in drawn] == expected_sampled
    assert stats["speculative"]["drafted"] > 0 and 0 <= stats["speculative"]["acceptance"] <= 1


def run_sampled(engine: Engine, prompt: list[int], new_tokens: int, sampling: Sampling, seed: int):
    import asyncio

    from moec.serve.request import DONE, Request

    async def go():
        request = Request(prompt, new_tokens, sampling, seed, asyncio.get_running_loop())
        engine.submit(request)
        items = []
        while (item := await asyncio.wait_for(request.output.get(), 120)) is not DONE:
            items.append(item)
        return items, request

    return asyncio.run(go())


def test_an_engine_over_a_model_without_mtp_refuses_speculation():
    with pytest.raises(ValueError, match="the spec has no model.head.mtp"):
        Engine(tiny_generator(None), speculative=True)


@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("speculative") / "run"
    Trainer(tiny_spec(1, steps=1), run_dir=run_dir).run()
    return run_dir


def test_generate_speculative_prints_the_greedy_text_and_its_acceptance(mtp_run):
    args = ["generate", str(mtp_run), "--prompt", "import json\n", "--max-new-tokens", "12", "--no-compile"]
    plain = runner.invoke(app, args + ["--temperature", "0"])
    drafted = runner.invoke(app, args + ["--speculative"])
    assert plain.exit_code == drafted.exit_code == 0, drafted.output
    assert drafted.stdout == plain.stdout
    assert drafted.stderr.startswith("speculative: acceptance ") and drafted.stderr.rstrip().endswith(" tokens/s")
    assert "drafted tokens" in drafted.stderr
