"""A tiny MoE language model spec for training tests: no compile, a few seconds per run."""

import moec

QUICK = """version: 1
name: quick
model:
  d_model: 32
  max_seq_len: 64
  inputs: {{kind: tokens, vocab: 256}}
  blocks:
    - repeat: 2
      layers:
        - kind: attention
          heads: 2
        - kind: moe
          experts: 4
          top_k: 2
          expert: {{hidden: 32, activation: swiglu}}
          {capacity}
  head: {{kind: lm}}
schedule:
  compile: {{enabled: false}}
  deterministic: true
train:
  seed: 0
  steps: {steps}
  batch: 8
  seq_len: 32
  optimizer: {{lr: 3.0e-3}}
  lr_schedule: {{warmup_steps: 2}}
  data: {{kind: text, files: ["{files}"]}}
  checkpoint: {{every: {every}, keep_last: 2}}
  eval: {{every: {every}, batches: 2}}
"""


def quick_text(steps=12, every=4, files="stdlib:json/*.py", capacity="") -> str:
    return QUICK.format(steps=steps, every=every, files=files, capacity=capacity)


def quick_spec(**kwargs):
    return moec.load_spec_text(quick_text(**kwargs), file="quick.yaml")
