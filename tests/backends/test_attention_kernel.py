"""``schedule.kernels.attention`` acts (issue 14): ``eager`` writes the softmax attention out,
``sdpa`` calls torch SDPA; both agree with the reference (outputs, aux, every gradient)."""

import pytest

import moec
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with


@pytest.mark.parametrize("kernel, call", [("eager", "attention_eager("), ("sdpa", "attention(")])
def test_attention_kernel_is_used_and_agrees(kernel, call):
    text = spec_with("        - kind: attention\n          heads: 4\n          kv_heads: 2\n", name=f"attn_{kernel}").source.text
    spec = moec.load_spec_text(text.replace("train:\n", f"schedule:\n  kernels: {{attention: {kernel}}}\ntrain:\n"), file="a.yaml")
    source = moec.compile_spec(spec).source
    assert f"= {call}" in source and ("attention_eager(" in source) == (kernel == "eager")
    assert_agree(spec, seeds=(0,), shapes=((2, 16), (1, 3)))
