"""The decode path of a generated program: ``forward`` with a KV cache.

For models that can decode incrementally every ``forward`` takes ``cache`` (a ``KVCache``, None
when training). These ops read it and nothing else does:

- ``rope`` rotates at the tokens' absolute ``cache.positions``, not at 0..S-1;
- ``attention`` writes the new keys and values into its layer's slot of the cache and attends
  over the first ``cache.bucket`` slots, masked by position (``attention_cached``, grouped KV heads);
- MLA's ``latent_cache`` writes the new latent and rope key into its layer's slot and returns the first
  ``cache.bucket`` positions of both (``latent_cache``); ``mla_attention`` masks them by position;
- ``pos_embed`` (learned positions) reads the table at ``cache.positions``.

The MoE layers run as in training on the step's tokens. The root class also gets ``decode``,
``new_cache``, ``prefill``, ``decode_step``, ``decode_steps`` (several tokens per row, unpadded) and
``compile_decode``.

Models whose output at a position depends on later positions or on the other tokens of the
batch cannot reuse a cache; :func:`decode_support` names the reason and no decode path is
written (generation then recomputes over the window).
"""

from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.moe import ROUTERS

# Ops whose expression does not depend on where a token sits in the sequence (besides the three above).
POSITION_FREE = {"embed", "linear", "rmsnorm", "head_rmsnorm", "layernorm", "activation", "glu", "clamped_glu", "add",
                 "sigmoid_gate", "constant", "load_balance_pooled", "moe", "dynamics", "split"}
# MLA (multi-head latent attention): ``latent_cache`` writes and reads the layer's slot, ``mla_attention`` masks by position.
MLA_OPS = ("latent_cache", "mla_attention")


def decode_support(graph: Graph) -> str | None:
    """None when the graph can decode with a KV cache, else why not (one line)."""
    for node in graph.nodes:
        if node.op in ("param", "input", "rope", "pos_embed", *MLA_OPS) or node.op in POSITION_FREE and node.op != "moe":
            continue
        if node.op == "spectral_moe":
            return "its spectral MoE layers mix the whole window (an FFT over the sequence)"
        if node.op == "attention" and not node.attr["causal"]:
            return "its attention is not causal"
        if node.op == "moe":
            router = ROUTERS[node.attr["moe"].router.kind]
            if router.score_op == "sinkhorn" or router.expert_choice:
                return f"its {router.name} router balances over all tokens of the batch"
            continue
        if node.op != "attention":
            return f"its {node.op} op has no decode form"
    return None


def cache_layers(graph: Graph) -> list[tuple[int, int, int]]:
    """(heads, width of the first, width of the second tensor) of each layer's cache slot, in order: attention
    (kv_heads, head_dim, head_dim) for its keys and values, MLA (1, kv_lora_rank, qk_rope_head_dim) for its latent and rope key."""
    layers = []
    for node in graph.nodes:
        if node.op == "attention":
            layers.append((node.attr["kv_heads"], node.attr["head_dim"], node.attr["head_dim"]))
        elif node.op == "latent_cache":
            layers.append((1, *(graph.type_of(ref).shape[-1] for ref in node.inputs)))
    return layers


def repeated(values: tuple) -> str:
    """``((2, 16),) * 64`` for 64 equal entries; the tuple itself otherwise."""
    if len(values) > 1 and len(set(values)) == 1:
        return f"({values[0]!r},) * {len(values)}"
    return repr(values)


def root_methods(graph: Graph, arg: str) -> list[str]:
    """``decode`` (``forward`` with a cache) and the cache-handling methods around it."""
    layers = tuple(cache_layers(graph))
    mla = any(node.op == "latent_cache" for node in graph.nodes)
    what = ("attention (kv_heads, key width, value width), MLA (1, kv_lora_rank, qk_rope_head_dim)" if mla
            else "(kv_heads, key width, value width)")
    return [
        "",
        f"    KV_LAYERS = {repeated(layers)}  # per layer's cache: {what}",
        "",
        f"    def decode(self, {arg}, cache, positions, bucket):",
        f'        """{arg} at absolute positions [B,S]; each attention layer reads and writes its cache[i] = (k, v) [B,KV,L,hd]'
        + (', each MLA layer its (latent, rope key) [B,1,L,r], [B,1,L,rope]."""' if mla else '."""'),
        f"        return self({arg}, KVCache(cache, positions, bucket))",
        "",
        "    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:",
        '        """A zeroed KV cache for ``length`` positions (at most model.max_seq_len): per layer two [batch, heads, length, width]."""',
        "        param = next(self.parameters())",
        "        return [tuple(torch.zeros(batch, heads, length, width, device=param.device, dtype=param.dtype) for width in widths)",
        "                for heads, *widths in self.KV_LAYERS]",
        "",
        "    def compile_decode(self, **options):",
        '        """torch.compile the decode path with static shapes: one graph per (input length, key bucket)."""',
        "        self._decode = torch.compile(self.decode, dynamic=False, **options)",
        "        return self",
        "",
        f"    def prefill(self, {arg}, cache, start: int = 0) -> torch.Tensor:",
        f'        """{arg} [B,S] at positions start..start+S-1 into the cache; returns their outputs [B,S,...].',
        "",
        "        The input is padded to a power-of-two length (static shapes); the padding's keys land after",
        "        the prompt and are overwritten by the next steps before any query can see them.",
        '        """',
        f"        seq, length = {arg}.shape[1], cache[0][0].shape[2]",
        "        padded = min(length_bucket(seq, length), length - start)",
        f"        inputs = F.pad({arg}, (0, 0) * ({arg}.dim() - 2) + (0, padded - seq))",
        f"        positions = torch.arange(start, start + padded, device={arg}.device).expand({arg}.shape[0], padded)",
        "        out = getattr(self, '_decode', self.decode)(inputs, cache, positions, length_bucket(start + padded, length))",
        "        return out.output[:, :seq]",
        "",
        f"    def decode_step(self, {arg}, cache, position) -> torch.Tensor:",
        f'        """One new input per row ({arg} [B,1]) at ``position`` (an int, or one per row); returns outputs [B,...]."""',
        f"        batch, length = {arg}.shape[0], cache[0][0].shape[2]",
        "        positions = torch.as_tensor(position, device=" + arg + ".device).reshape(-1, 1).expand(batch, 1)",
        "        last = int(position) if isinstance(position, int) else int(max(position))",
        "        out = getattr(self, '_decode', self.decode)(" + arg + ", cache, positions, length_bucket(last + 1, length))",
        "        return out.output[:, 0]",
        "",
        f"    def decode_steps(self, {arg}, cache, position: int) -> ModelOutput:",
        f'        """Several new inputs per row ({arg} [B,S]) at positions position..position+S-1 in one forward, unpadded',
        "        (speculative decoding verifies its drafts with it); returns the whole ModelOutput, outputs [B,S,...].",
        "",
        "        Nothing truncates the cache afterwards: a query sees the keys at its own position and before only, and the",
        '        next call writes its positions first, so the keys of rejected tokens past it are never read."""',
        f"        batch, seq = {arg}.shape[:2]",
        f"        positions = torch.arange(position, position + seq, device={arg}.device).expand(batch, seq)",
        "        bucket = length_bucket(position + seq, cache[0][0].shape[2])",
        f"        return getattr(self, '_decode', self.decode)({arg}, cache, positions, bucket)",
    ]
