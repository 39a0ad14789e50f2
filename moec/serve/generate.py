"""Generation from a trained model: tokens with the generated KV-cache decode path, or by recomputing.

Token models whose program has a decode path (``model.decode_step``: see
``moec.backends.torch.decode``) prefill the prompt once and then run one token per step over
the cache, compiled with static shapes per power-of-two length bucket. Models without one
(spectral MoE mixes the whole window; Sinkhorn and expert-choice routers balance over all
tokens) recompute the whole window for every new token: correct, and slower.

Continuous models (signals, trajectories) are rolled out: the model's prediction of the next
value is fed back as its next input, and the rollout is compared with the held-out truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moec.backends.torch.decode import decode_support
from moec.serve.sampling import Sampling, next_tokens

DECODE_RECOMPILE_LIMIT = 64  # prefill shapes x key buckets of one decode method; dynamo's default of 8 is too few


class Generator:
    """Streams the tokens that follow a prompt; one instance per loaded model (the compiled graphs stay with it)."""

    def __init__(self, model, spec, compile: bool = True, backend: str = "inductor"):
        if spec.model.inputs.kind != "tokens":
            raise ValueError(f"{spec.name} takes continuous inputs: it is rolled out (moec generate --steps), not prompted")
        self.model, self.spec = model.eval(), spec
        self.window = spec.model.max_seq_len
        self.cached = hasattr(model, "decode_step")
        self.uncached_reason = None if self.cached else decode_support(model.program.graph)
        if self.cached and compile:
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, DECODE_RECOMPILE_LIMIT)
            model.compile_decode(fullgraph=True, backend=backend)

    def check_prompt(self, prompt: list[int]) -> None:
        """A ValueError naming the problem: an empty prompt, an id past the vocabulary, a prompt longer than the window."""
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.spec.model.inputs.vocab
        if any(not 0 <= token < vocab for token in prompt):
            bad = next(token for token in prompt if not 0 <= token < vocab)
            raise ValueError(f"token id {bad} is outside the model's vocabulary (model.inputs.vocab is {vocab})")
        if len(prompt) > self.window:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's window (model.max_seq_len) is {self.window}")

    @torch.no_grad()
    def stream(self, prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None, seed: int = 0) -> Iterator[int]:
        """The next ``max_new_tokens`` token ids, one at a time (a seeded generator: same seed, same text)."""
        self.check_prompt(prompt)
        sampling = sampling or Sampling()
        generator = torch.Generator().manual_seed(seed)
        device = next(self.model.parameters()).device
        tokens = torch.tensor([prompt], dtype=torch.long, device=device)
        if not self.cached:
            for _ in range(max_new_tokens):
                logits = self.model(tokens[:, -self.window:]).output[:, -1]
                token = next_tokens(logits, sampling, generator)
                tokens = torch.cat([tokens, token[:, None]], 1)
                yield int(token)
            return
        cache = self.model.new_cache(1, self.window)
        logits = self.model.prefill(tokens, cache)[:, -1]
        position = tokens.shape[1]
        for _ in range(max_new_tokens):
            token = next_tokens(logits, sampling, generator)
            tokens = torch.cat([tokens, token[:, None]], 1)
            yield int(token)
            if position == self.window:  # the cache is full: keep the last half window and prefill it again
                kept = tokens[:, -(self.window // 2):]
                logits, position = self.model.prefill(kept, cache)[:, -1], kept.shape[1]
                continue
            logits = self.model.decode_step(token[:, None], cache, position)
            position += 1


@dataclass
class Rollout:
    context: torch.Tensor  # [C, D] the values the model saw
    truth: torch.Tensor  # [T, D] what followed
    prediction: torch.Tensor  # [T, D] the model's rollout, each prediction fed back
    mse: float


@torch.no_grad()
def rollout(model, spec, steps: int, context: int | None = None, index: int = 0) -> Rollout:
    """Roll a continuous model out for ``steps`` values after ``context`` held-out values (validation split).

    The window is recomputed for every step (the rollout is short; continuous models with a
    decode path could use it, but these models' Sinkhorn routers have none).
    """
    from moec.data.kinds import make_dataset

    window = spec.model.max_seq_len
    context = context or max(1, min(spec.train.seq_len, window) - steps)
    dataset = make_dataset(spec)
    dataset.seq_len = context + steps - 1  # windows of seq_len + 1 values: context, then the truth
    values = dataset.windows(torch.Generator().manual_seed(spec.train.seed + 1 + index), "val", 1)[0]  # [C+T, D]
    device = next(model.parameters()).device
    seen = values[:context].to(device)
    for _ in range(steps):
        prediction = model(seen[None, -window:]).output[0, -1]
        seen = torch.cat([seen, prediction[None].to(seen.dtype)], 0)
    predicted, truth = seen[context:].cpu(), values[context:]
    return Rollout(values[:context], truth, predicted, torch.mean((predicted - truth) ** 2).item())


def plot_rollout(result: Rollout, path, title: str) -> None:
    """Prediction against the truth per channel; trajectories (3 channels) also get a 3-D view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels = result.truth.shape[1]
    three_d = channels == 3
    fig = plt.figure(figsize=(10, 3 * channels + (4 if three_d else 0)))
    rows = channels + (2 if three_d else 0)
    c, t = result.context.shape[0], result.truth.shape[0]
    for ch in range(channels):
        ax = fig.add_subplot(rows, 1, ch + 1)
        ax.plot(range(c), result.context[:, ch], color="gray", label="context")
        ax.plot(range(c, c + t), result.truth[:, ch], color="black", label="truth")
        ax.plot(range(c, c + t), result.prediction[:, ch], color="tab:red", linestyle="--", label="rollout")
        ax.set_ylabel(f"channel {ch}")
        if ch == 0:
            ax.set_title(f"{title}: rollout MSE {result.mse:.4g}")
            ax.legend(loc="upper left")
    if three_d:
        ax = fig.add_subplot(rows // 2 + 1, 1, rows // 2 + 1, projection="3d")
        ax.plot(*result.truth.T.numpy(), color="black", label="truth")
        ax.plot(*result.prediction.T.numpy(), color="tab:red", linestyle="--", label="rollout")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
