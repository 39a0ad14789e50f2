"""lm-evaluation-harness's ``local-completions`` model against ``moec serve``, on a multiple-choice task of the repository.

lm-eval tokenizes through the server (``/tokenizer_info``, ``/tokenize``), posts token ids with
``echo: true, logprobs: 1, max_tokens: 1`` and sums ``token_logprobs[ctxlen:-1]``; here its
per-choice log-likelihoods and its ``acc`` are checked against the model's own forward.
"""

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).parent / "lm_eval_task"


def direct_loglikelihood(model, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward of the byte model (lm-eval's pairing: " " + choice)."""
    ids = list((context + continuation).encode())
    start = len(context.encode())
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).output[0].float(), -1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_lm_eval_local_completions_scores_as_the_model_does(server, trained_model):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, spec = trained_model
    args = {"base_url": f"{server}/v1/completions", "model": spec.name, "max_length": spec.model.max_seq_len + 1,
            "batch_size": 4, "max_retries": 1}
    out = simple_evaluate(model="local-completions", model_args=args, tasks=["moec_tiny_mc"], log_samples=True,
                          task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    samples = sorted(out["samples"]["moec_tiny_mc"], key=lambda s: s["doc_id"])
    items = [json.loads(line) for line in (TASK_DIR / "moec_tiny_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(items) == 8
    worst, correct = 0.0, 0
    for sample, item in zip(samples, items):
        theirs = [resp[0][0] for resp in sample["resps"]]
        ours = [direct_loglikelihood(model, item["context"], " " + choice) for choice in item["choices"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(theirs, ours)))
        correct += int(max(range(len(ours)), key=ours.__getitem__) == item["answer"])
    assert worst < 1e-4, worst
    assert out["results"]["moec_tiny_mc"]["acc,none"] == correct / len(items)
