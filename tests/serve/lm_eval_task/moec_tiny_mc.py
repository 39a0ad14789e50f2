"""The items of the moec_tiny_mc task: moec_tiny_mc.jsonl beside this file, as a datasets split (no download)."""

import json
from pathlib import Path

import datasets


def load(**kwargs):  # lm-eval passes the task's metadata; the file is fixed
    lines = (Path(__file__).with_suffix(".jsonl")).read_text(encoding="utf-8").splitlines()
    return {"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])}
