"""The fused MoE and spectral MoE code of a program, and the helper functions it calls.

An ``MoE`` or ``SpectralMoE`` layer's ``forward`` is the fused function of its configuration
(``codegen_moe``) written as a method: its parameters read from ``self``, ``training`` from
the module. A spectral layer's inner MoE, applied ``depth`` times, stays a module-level
function.
"""

from __future__ import annotations

import re

from moec.backends.torch import codegen_moe, codegen_spectral
from moec.backends.torch.codegen_moe import slot_arg
from moec.backends.torch.statements import param_expr
from moec.ir.graph import Node
from moec.moe import EXPERT_PREFIX

class FusedFunctions:
    """One fused function per distinct MoE / spectral configuration: routed_experts, routed_experts2, spectral_mixer, ..."""

    def __init__(self, moe_kernel: str, spectral_kernel: str, attention_kernel: str = "auto", expert_parallel: bool = False,
                 tiles: tuple[int, ...] = (), splits: dict[str, str] | None = None, context_parallel: bool = False,
                 measured_kernels: dict | None = None):
        self.moe_kernel, self.spectral_kernel, self.expert_parallel = moe_kernel, spectral_kernel, expert_parallel
        self.measured_kernels = measured_kernels or {}  # kernels.moe auto, measured: MoeAttrs -> kernel
        self.context_parallel = context_parallel  # sharding.sequence: attention gathers K/V, MoE counts sum over cp
        self.splits = splits or {}  # tensor parallelism: parameter name -> column / row
        self.split_experts = any(EXPERT_PREFIX in name for name in self.splits)
        self.tiles, self.triton = tiles, False  # triton: some function calls moec.backends.triton
        self.attention = "attention_eager" if attention_kernel == "eager" else "attention"  # auto, sdpa: torch SDPA
        self.names: dict[tuple, str] = {}
        self.sources: dict[str, list[str]] = {}

    def moe(self, attrs: dict) -> str:
        key = ("moe", tuple(sorted(attrs.items())))
        if key not in self.names:
            count = sum(k[0] == "moe" for k in self.names)
            name = f"routed_experts{count + 1 if count else ''}"  # a spectral layer's inner MoE, called once per step
            self.names[key] = name
            kernel = codegen_moe.choose_kernel(self.moe_kernel, attrs["moe"], self.expert_parallel, self.measured_kernels)
            self.triton |= codegen_moe.uses_triton(kernel) and not self.expert_parallel
            moe = codegen_moe.counted_over_group(attrs["moe"]) if self.context_parallel else attrs["moe"]
            self.sources[name] = codegen_moe.moe_function(name, attrs["slots"], moe, kernel, self.expert_parallel, self.tiles,
                                                          tensor_parallel=self.split_experts)
        return self.names[key]

    def spectral(self, attrs: dict) -> str:
        key = ("spectral", tuple(sorted(attrs.items())))
        if key not in self.names:
            moe_name = self.moe({"slots": codegen_spectral.inner_slots(attrs["slots"]), "moe": attrs["moe"]})
            count = sum(k[0] == "spectral" for k in self.names)
            name = f"spectral_mixer{count + 1 if count else ''}"
            self.names[key] = name
            inner = codegen_moe.uses_batch_group(self.sources[moe_name])
            source = codegen_spectral.spectral_function(name, moe_name, attrs, self.spectral_kernel, inner, self.context_parallel)
            self.sources[name] = codegen_moe.with_batch_group(source)
        return self.names[key]

    def attention_fn(self, node: Node) -> str:
        """Sinks or a sliding window: the written-out ``attention_local``; else the kernel's choice."""
        return "attention_local" if len(node.inputs) == 4 or node.attr.get("window") is not None else self.attention


def fused_method(emitter, part, node: Node) -> tuple[list[str], str]:
    """The layer's ``forward``: the fused function of ``node`` with its parameters read from ``self``; and its summary."""
    graph = emitter.graph
    name = emitter.fused.moe(node.attr) if node.op == "moe" else emitter.fused.spectral(node.attr)
    lines = emitter.fused.sources[name]
    mapping, signature = {"training": "self.training", "batch_group": "self.batch_group", "context": "self.context"}, []
    for slot, ref in zip(node.attr["slots"], node.inputs):
        source, arg = graph[ref.node], slot_arg(slot)
        if source.op == "param":
            mapping[arg] = param_expr(source.attr["name"], part.prefix)  # split experts: the body reads local(...)
            continue
        first = next(s for s, r in zip(node.attr["slots"], node.inputs) if r == ref)
        if first != slot:  # the same value again (the router reads the layer's input): one argument
            mapping[arg] = slot_arg(first)
        else:  # a token-id router's input keeps its slot name (router_in): the body's ``tokens`` is the token count
            signature.append(arg)
    body = ["    " + _substitute(line, mapping) for line in lines[2:]]
    summary = lines[1].strip().strip('"').rstrip(".")
    return [f"    def forward(self, {', '.join(signature)}):", *body], summary + "."


def _substitute(line: str, mapping: dict[str, str]) -> str:
    """Replace whole identifiers in the code part of ``line`` (not in its comment)."""
    code, sep, comment = line.partition("  # ")
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda m: mapping[m.group(1)], code) + sep + comment


def fused_sources(emitter, text: str) -> list[list[str]]:
    """The module-level fused functions the program calls (a spectral layer's inner MoE), in the order made."""
    return [lines for name, lines in emitter.fused.sources.items() if re.search(rf"(?<![\w.]){re.escape(name)}\(", text)]
