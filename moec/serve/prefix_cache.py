"""An LRU cache of prompt KV, bounded by tokens: a prompt that extends a cached one skips its prefill.

Entries are keyed by a prompt's token ids and hold that prompt's keys and values (per
attention layer, [1, KV, n, hd]) and the logits after its last token. A lookup finds the
longest cached prompt that is a prefix of the new one; the caller prefills only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per attention layer, [1, KV, n, hd]
    logits: torch.Tensor  # [1, V] after the prompt's last token


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self.tokens = self.hits = self.misses = self.hit_tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[int, Entry | None]:
        """(length of the longest cached prefix of ``prompt``, its entry); counts a hit or a miss."""
        best = None
        for key in self.entries:
            if len(key) <= len(prompt) and (best is None or len(key) > len(best)) and tuple(prompt[:len(key)]) == key:
                best = key
        if best is None:
            self.misses += 1
            return 0, None
        self.entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += len(best)
        return len(best), self.entries[best]

    def store(self, prompt: list[int], cache: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor) -> None:
        """Keep the first len(prompt) positions of a batch-1 cache; evict the least recently used beyond max_tokens."""
        key, n = tuple(prompt), len(prompt)
        if n > self.max_tokens or key in self.entries:
            return
        self.entries[key] = Entry([(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in cache], logits.clone())
        self.tokens += n
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)

    def stats(self) -> dict:
        return {"entries": len(self.entries), "tokens": self.tokens, "max_tokens": self.max_tokens, "hits": self.hits,
                "misses": self.misses, "hit_tokens": self.hit_tokens}
