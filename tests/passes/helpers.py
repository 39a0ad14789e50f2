"""Small specs for pass and interpreter tests, written inline so each test shows its model."""

import moec

BASE = """
version: 1
name: {name}
model:
  d_model: {d_model}
  max_seq_len: 64
  inputs: {inputs}
  blocks:
    - repeat: {repeat}
      layers:
{layers}
  head: {head}
train:
  seed: {seed}
  steps: 10
  batch: 4
  seq_len: 16
  optimizer: {{lr: 1.0e-3}}
  data: {data}
"""


def spec_with(layers: str, name: str = "t", d_model: int = 16, repeat: int = 1, seed: int = 0, tokens: bool = True):
    inputs = "{kind: tokens, vocab: 256}" if tokens else "{kind: continuous, dims: 1}"
    head = "{kind: lm}" if tokens else "{kind: regression, pool: last}"
    data = "{kind: text}" if tokens else "{kind: signals}"
    text = BASE.format(name=name, d_model=d_model, inputs=inputs, repeat=repeat, layers=layers, head=head, seed=seed, data=data)
    return moec.load_spec_text(text, file=f"{name}.yaml")


MOE = """        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 8, activation: swiglu}
"""
SPECTRAL = """        - kind: spectral_moe
          depth: 3
          moe: {experts: 4, top_k: 2, expert: {hidden: 8, activation: gelu}}
"""
