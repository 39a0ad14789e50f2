"""One tensor-parallel forward and backward of ``specs/deepseek_v3_tiny.yaml`` (MLA) on the ranks of ``torchrun``,
against the one-process model (``tp_worker.compare``): the heads split over tp (wq_b, wkv_b by columns, wo by rows),
the q and kv latents (wq_a, q_norm, wkv_a, kv_norm) whole on every rank; with q_lora_rank 0 (one plain wq); with
biases (wo's whole beside its row split); and under
sequence parallelism (the dense blocks only: SP runs no MoE layer).
``python -m torch.distributed.run --nproc-per-node 2 -m tests.distributed.mla_tp_worker OUT.json``
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import yaml

from tests.conftest import REPO
from tests.distributed.tp_worker import compare, write_and_exit

# The MoE layers stay whole: tensor parallelism of experts refuses shared experts (moec.schema.checks_tensor).
TP2 = {"mesh": {"world_size": 2, "axes": {"tp": 2}},
       "sharding": {"tensor": {"axis": "tp", "column": ["attention.qkv", "mlp.up"], "row": ["attention.out", "mlp.down"]}}}


def deepseek_text(parallel: dict | None = None, q_lora_rank: int | None = None, dense: bool = False, bias: bool = False) -> str:
    """deepseek_v3_tiny at test size (5 steps of 8 x 32 tokens, eager, deterministic) with ``parallel``'s mesh and
    sharding; ``q_lora_rank`` 0: one plain wq; ``dense``: its two dense blocks only, no head.mtp; ``bias``: HF's attention_bias
    (on wq_a, wkv_a and wo). With the spec's head.mtp: its block splits as the last block does."""
    spec = yaml.safe_load((REPO / "specs" / "deepseek_v3_tiny.yaml").read_text())
    if dense:  # for sequence parallelism, which refuses head.mtp (moec.schema.checks._mtp_parallelism)
        spec["model"]["blocks"] = spec["model"]["blocks"][:1]
        del spec["model"]["head"]["mtp"]
    for block in spec["model"]["blocks"]:
        block["layers"][0]["bias"] = bias
        if q_lora_rank is not None:
            block["layers"][0]["q_lora_rank"] = q_lora_rank
    spec["train"].update(steps=5, batch=8, seq_len=32, lr_schedule={"warmup_steps": 2}, eval={"every": 3, "batches": 2},
                         checkpoint={"every": 3, "keep_last": 2}, data={"kind": "text", "files": ["stdlib:json/*.py"]})
    spec["schedule"] = {"compile": {"enabled": False}, "deterministic": True}
    return yaml.safe_dump(spec | (parallel or {}), sort_keys=False)


def vocabulary() -> dict:
    """TP2 with the head split along the vocabulary: the MTP depths' logits through the shared head stay split too,
    and their loss reduces over tp (moec.train.vocab_loss)."""
    tensor = TP2["sharding"]["tensor"]
    return TP2 | {"sharding": {"tensor": tensor | {"column": tensor["column"] + ["head"]}}}


def sequence_parallel() -> dict:
    tensor = TP2["sharding"]["tensor"] | {"sequence_parallel": True}
    return TP2 | {"sharding": {"tensor": tensor}}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    diffs = {"q_lora": compare(deepseek_text(), deepseek_text(TP2), tokens),
             "plain_q": compare(deepseek_text(q_lora_rank=0), deepseek_text(TP2, q_lora_rank=0), tokens),
             "bias": compare(deepseek_text(bias=True), deepseek_text(TP2, bias=True), tokens),
             "vocab": compare(deepseek_text(), deepseek_text(vocabulary()), tokens),
             "sequence_parallel": compare(deepseek_text(dense=True), deepseek_text(sequence_parallel(), dense=True), tokens)}
    write_and_exit(out_path, diffs)


if __name__ == "__main__":
    main(sys.argv[1])
