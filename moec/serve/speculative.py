"""Self-speculative decoding with the multi-token prediction modules (``head.mtp``, DeepSeek-V3), greedy only.

Each round the MTP modules draft up to D tokens from the model's last hidden state (``model.draft``), the model
reads the chosen token and the drafts in one forward (``model.decode_steps``), and the drafts are kept up to the
first one that differs from the model's own greedy choice; the model's choice after them comes free. The output is
the model's greedy output token for token: every kept token is one the model chose. Rejected drafts leave keys in
the cache past the kept length; the next round overwrites them before any query reads them, so nothing truncates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moec.backends.torch.decode_snippets import length_bucket
from moec.serve.sampling import Sampling


@dataclass
class SpeculationStats:
    """Counts over the rounds of one or more streams."""

    drafted: int = 0  # draft tokens the model verified
    accepted: int = 0  # of them, the ones equal to its own greedy choice
    rounds: int = 0  # verifying forwards (each emits the accepted drafts plus one token of the model's)

    @property
    def acceptance(self) -> float:
        """accepted / drafted: 0.0 before any draft."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds, "acceptance": self.acceptance}


def speculation_refusal(generator, sampling: Sampling | None = None) -> str | None:
    """Why speculative decoding cannot run for this model (and sampling), in one line; None when it can."""
    if generator.spec.model.head.mtp is None:
        return "speculative decoding drafts with the multi-token prediction modules, and the spec has no model.head.mtp"
    if not generator.cached:
        return f"speculative decoding verifies drafts over the KV cache, and this model has none ({generator.uncached_reason})"
    if sampling is not None and sampling.temperature != 0:
        return f"speculative decoding is greedy only (temperature 0); got temperature {sampling.temperature:g}"
    return None


def accepted_length(drafts: list[int], choices: list[int]) -> int:
    """How many leading drafts equal the model's greedy choices at the same positions."""
    kept = 0
    while kept < len(drafts) and drafts[kept] == choices[kept]:
        kept += 1
    return kept


@torch.no_grad()
def speculative_stream(generator, prompt: list[int], max_new_tokens: int,
                       stats: SpeculationStats | None = None) -> Iterator[int]:
    """The next ``max_new_tokens`` greedy token ids, as :meth:`Generator.stream` with temperature 0 gives them."""
    generator.check_prompt(prompt)
    refusal = speculation_refusal(generator)
    if refusal:
        raise ValueError(refusal)
    model, window, depth = generator.model, generator.window, generator.spec.model.head.mtp.depth
    stats = stats if stats is not None else SpeculationStats()
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = model.new_cache(1, window)
    hidden, token = _read(model, tokens, cache)
    produced = 0
    while produced < max_new_tokens:
        tokens = torch.cat([tokens, token.view(1, 1)], 1)
        produced += 1
        yield int(token)
        position = tokens.shape[1] - 1  # where the chosen token goes
        if produced == max_new_tokens:
            return
        if position == window:  # the cache is full: keep the last half window and read it again, as plain decoding does
            tokens = tokens[:, -(window // 2):]
            hidden, token = _read(model, tokens, cache)
            continue
        room = min(depth, window - 1 - position, max_new_tokens - produced - 1)  # drafts worth verifying
        kept, token, hidden = _draft_and_verify(model, tokens, hidden, cache, room, stats)
        tokens = torch.cat([tokens, kept], 1)
        produced += kept.shape[1]
        yield from kept[0].tolist()


def _draft_and_verify(model, tokens: torch.Tensor, hidden: torch.Tensor, cache, room: int, stats: SpeculationStats):
    """One round from ``tokens`` [1,S+1] (the last one chosen, not yet read) and the hidden states [1,S,D] of the
    others: (the kept drafts [1,a], the model's greedy token after them, the hidden states [1,S+a+1,D])."""
    position = tokens.shape[1] - 1
    drafts = model.draft(hidden, tokens)[:, :room] if room else tokens[:, :0]
    out = model.decode_steps(torch.cat([tokens[:, -1:], drafts], 1), cache, position)
    choices = out.output[0].float().argmax(-1)  # the model's greedy choice after each token it read
    kept = accepted_length(drafts[0].tolist(), choices[:room].tolist())
    stats.drafted, stats.accepted, stats.rounds = stats.drafted + room, stats.accepted + kept, stats.rounds + 1
    return drafts[:, :kept], choices[kept], torch.cat([hidden, out.hidden[:, : kept + 1]], 1)


def _read(model, tokens: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [1,S] from position 0 into the cache: (their hidden states [1,S,D], the greedy next token). Padded to a
    power-of-two length as ``prefill`` pads (one compiled graph per length bucket, not per prompt length); the
    padding's keys lie past the prompt, where the next rounds write before any query reads."""
    seq = tokens.shape[1]
    padded = length_bucket(seq, cache[0][0].shape[2])
    out = model.decode_steps(F.pad(tokens, (0, padded - seq)), cache, 0)
    return out.hidden[:, :seq], out.output[0, seq - 1].float().argmax(-1)
