"""The decode path of a generated program: the same graph, written once more with a KV cache.

``emit`` writes every module's ``forward`` from the fused graph; for models that can decode
incrementally it writes a second method, ``decode(..., cache, positions, bucket)``, from the
same nodes in the same order. Three ops change their expression and nothing else does:

- ``rope`` rotates at the tokens' absolute ``positions`` (``rope_at``), not at 0..S-1;
- ``attention`` writes the new keys and values into its layer's cache and attends over the
  first ``bucket`` slots, masked by position (``attention_cached``, grouped KV heads);
- ``pos_embed`` (learned positions) reads the table at ``positions``.

The MoE layers call the same fused function as ``forward`` on the step's tokens. The root
class also gets ``new_cache``, ``prefill``, ``decode_step`` and ``compile_decode``.

Models whose output at a position depends on later positions or on the other tokens of the
batch cannot reuse a cache; :func:`decode_support` names the reason and no decode path is
written (generation then recomputes over the window).
"""

from __future__ import annotations

import inspect

from moec.backends.torch import decode_snippets
from moec.ir.graph import Graph, Node
from moec.moe import ROUTERS

# Ops whose expression does not depend on where a token sits in the sequence (besides the three above).
POSITION_FREE = {"embed", "linear", "rmsnorm", "head_rmsnorm", "layernorm", "activation", "glu", "clamped_glu", "add",
                 "sigmoid_gate", "constant", "load_balance_pooled", "moe", "dynamics"}


def decode_support(graph: Graph) -> str | None:
    """None when the graph can decode with a KV cache, else why not (one line)."""
    for node in graph.nodes:
        if node.op in ("param", "input", "rope", "pos_embed") or node.op in POSITION_FREE and node.op != "moe":
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


def attention_layers(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "attention"]


class DecodeExpressions:
    """The decode-path expressions of rope, attention and pos_embed; None for every other op."""

    def __init__(self, graph: Graph):
        self.layer = {node.name: index for index, node in enumerate(attention_layers(graph))}

    def expression(self, node: Node, args: list[str]) -> str | None:
        if node.op == "rope":
            a = node.attr
            freqs = (f"rope_frequencies({a['head_dim']}, {a['theta']!r})" if "factor" not in a else
                     f"yarn_frequencies({a['head_dim']}, {a['theta']!r}, {a['factor']!r}, {a['original']!r}, "
                     f"{a['beta_fast']!r}, {a['beta_slow']!r}, {a['truncate']!r})")
            return f"rope_at({args[0]}, {a['heads']}, {a['head_dim']}, *{freqs}, positions)"
        if node.op == "attention":
            a, sinks = node.attr, args[3] if len(args) == 4 else "None"
            return (f"attention_cached({', '.join(args[:3])}, {a['heads']}, {a['kv_heads']}, {a['head_dim']}, "
                    f"cache[{self.layer[node.name]}], positions, bucket, {a.get('window')!r}, {sinks})")
        if node.op == "pos_embed":
            return f"{args[0]} + {args[1]}[positions]"
        return None


def helpers(graph: Graph) -> list[list[str]]:
    """Source lines of the decode snippets the program calls."""
    used = {"attention_cached", "length_bucket"}
    for node in graph.nodes:
        if node.op == "rope":
            used |= {"rope_at"} | ({"rope_frequencies"} if "factor" not in node.attr else set())
    order = [name for name, fn in vars(decode_snippets).items() if inspect.isfunction(fn) and fn.__module__ == decode_snippets.__name__]
    return [inspect.getsource(getattr(decode_snippets, name)).rstrip().splitlines() for name in order if name in used]


def block_method(args: str, body: list[str]) -> list[str]:
    return ["", f"    def decode(self, {args}, cache, positions, bucket):", *body]


def root_methods(graph: Graph, arg: str, body: list[str]) -> list[str]:
    """``decode`` (the graph once more) and the cache-handling methods around it."""
    layers = tuple((node.attr["kv_heads"], node.attr["head_dim"]) for node in attention_layers(graph))
    return [
        "",
        f"    KV_LAYERS = {layers!r}  # (kv_heads, head_dim) of each attention layer's cache, in order",
        "",
        f"    def decode(self, {arg}, cache, positions, bucket):",
        f'        """{arg} at absolute positions [B,S]; each attention layer reads and writes its cache[i] = (k, v) [B,KV,L,hd]."""',
        *body,
        "",
        "    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:",
        '        """A zeroed KV cache for ``length`` positions (at most model.max_seq_len): per attention layer (k, v) [batch, kv_heads, length, head_dim]."""',
        "        param = next(self.parameters())",
        "        return [tuple(torch.zeros(batch, kv, length, hd, device=param.device, dtype=param.dtype) for _ in range(2))",
        "                for kv, hd in self.KV_LAYERS]",
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
    ]
