"""Multi-token prediction in a generated program (``head.mtp``): the ``MTP`` class and the root's loop over ``self.mtp``.

The graph's outputs after (prediction, aux) are the depths' logits and their blocks' aux loss; the rest of the
emitter sees the main model only (``main_graph``). Each MTP module's block is an instance of the class of the model's
last block (the lowering copies that block), so the program states that with one line; the reference interpreter
runs the graph's own MTP nodes, and the tests hold the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.backends.torch.blocks import moe_layers
from moec.backends.torch.modules import INIT_ARGS, declarations, standard_modules
from moec.ir.graph import Graph
from moec.passes.cleanup import dce

MTP_CLASS = "MTP"


@dataclass(frozen=True)
class MtpPart:
    depth: int
    where: str  # the spec line of head.mtp
    init: list[str]  # the first module's __init__ lines for its norms and eh_proj (relative names)
    norm: list[str]  # the same for its final norm
    moe_layers: tuple[str, ...]  # the MoE layers of the MTP blocks (mtp.0.block.moe, ...), in forward order


def main_graph(graph: Graph) -> tuple[Graph, MtpPart | None]:
    """The graph of the main model (prediction, aux) and, with ``head.mtp``, what the MTP modules need."""
    if len(graph.outputs) == 2:
        return graph, None
    main, _ = dce(graph.with_nodes(graph.nodes, outputs=graph.outputs[:2]))
    modules = standard_modules(graph)
    proj = graph["mtp.0.eh_proj.weight"]
    origin = proj.origin
    where = f"{origin.file}:{origin.line} model.head.mtp" if origin and origin.file and origin.line else "model.head.mtp"
    init = declarations(graph, ["mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight"], "mtp.0", modules)
    norm = declarations(graph, ["mtp.0.norm.weight"], "mtp.0", modules)
    mtp_moe = tuple(name for name in moe_layers(graph) if name.startswith("mtp."))
    return main, MtpPart(depth=len(graph.outputs) - 3, where=where, init=init, norm=norm, moe_layers=mtp_moe)


def mtp_class(part: MtpPart, block_class: str, slot: bool, contract) -> list[str]:
    """``class MTP``: one depth of DeepSeek-V3's multi-token prediction around an instance of the last block's class."""
    returns = ", ".join(contract.outputs())
    return [
        f"class {MTP_CLASS}(nn.Module):",
        f'    """{part.where}: one multi-token prediction depth (DeepSeek-V3). Position i of depth k reads the previous',
        "    depth's hidden state (depth 1: the last block's, before the final norm) and the embedding of token i+k,",
        f'    and predicts token i+k+1 through the shared head; its block is shaped like the model\'s last block ({block_class})."""',
        "",
        f"    def __init__(self, {INIT_ARGS}) -> None:",
        "        super().__init__()",
        *part.init,
        f"        self.block = {block_class}({'None, ' if slot else ''}device, dtype){'  # never given a KV cache' if slot else ''}",
        *part.norm,
        "",
        "    def forward(self, h: torch.Tensor, e: torch.Tensor):",
        f'        """h: the previous depth\'s hidden state, e: the embedding of token i+k, both (B, S, D) -> {returns}."""',
        "        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))  # embedding first, as DeepSeek-V3's weights",
        "        return self.block(x)",
    ]


def _block_outputs(contract, x: str, aux: str, stats: str) -> list[str]:
    """The names an MTP block's outputs unpack into. A block's statistics for a model-pooled balance loss are dropped:
    validation admits load_balance_scope 'model' in the last block only with load_balance 0 (HF's DeepSeek-V3)."""
    if not contract.aux:
        return [x]
    return [x, aux] + (["_"] if contract.balance else []) + [stats]


def root_lines(arg: str, head: str, aux: str, stats: str, contract) -> list[str]:
    """The end of the root's ``forward``: in training each depth runs on the previous one's hidden state ``x``."""
    outputs = _block_outputs(contract, "x", "block_aux", "block_stats")
    lines = [
        "        output = self.predict(x)",
        "        if not self.training:  # the MTP modules train the model; generation drafts with them from the hidden state",
        f"            return ModelOutput(output=output, aux_loss={aux}, moe_stats={stats}, hidden=x)",
        "        mtp_logits, mtp_aux = [], 0.0",
        "        for k, mtp in enumerate(self.mtp, 1):  # depth k: position i predicts token i+k+1; the last k have no target",
        f"            {', '.join(outputs)} = mtp(x, self.embed(F.pad({arg}[:, k:], (0, k))))  # token i+k; id 0 past the end",
        f"            mtp_logits.append({head.format('mtp.norm(x)')})",
    ]
    if not contract.aux:
        return lines + [f"        return ModelOutput(output=output, aux_loss={aux}, moe_stats={stats}, mtp_logits=tuple(mtp_logits))"]
    lines += ["            mtp_aux = mtp_aux + block_aux  # the MTP blocks' aux losses join the model's",
              "            stats += block_stats  # and their MoE statistics follow the model's (MTP_MOE_LAYERS)"]
    return lines + [f"        return ModelOutput(output=output, aux_loss={aux} + mtp_aux, moe_stats={stats}, mtp_logits=tuple(mtp_logits))"]


def draft_method(arg: str, head: str, depth: int, contract) -> list[str]:
    """``draft``: self-speculative decoding's greedy drafts, depth k's module drafting the k-th next token."""
    outputs = _block_outputs(contract, "hidden", "_", "_")
    return [
        "",
        f"    def draft(self, hidden: torch.Tensor, {arg}: torch.Tensor) -> torch.Tensor:",
        f'        """Greedy drafts of the next {depth} tokens: hidden [B,S,D] is the model\'s hidden state (ModelOutput.hidden) at',
        f"        positions 0..S-1, {arg} [B,S+1] the tokens 0..S (token S chosen, not yet fed); depth k drafts token S+k.",
        "",
        "        The MTP blocks recompute over the whole window (no KV cache of their own): depth k at position i reads",
        "        token i+k, which is a draft for the last k-1 positions, so a cache would need rolling back per depth after",
        "        every verification. The price: each round runs every depth's block over the whole window.",
        '        Returns the drafted tokens [B, depth]."""',
        "        drafts = []",
        "        for k, mtp in enumerate(self.mtp, 1):",
        f"            following = torch.cat([{arg}[:, k:], *drafts], dim=1)  # token i+k of each position i",
        f"            {', '.join(outputs)} = mtp(hidden, self.embed(following))",
        f"            drafts.append({head.format('mtp.norm(hidden[:, -1:])')}.argmax(-1))",
        "        return torch.cat(drafts, dim=1)",
    ]
