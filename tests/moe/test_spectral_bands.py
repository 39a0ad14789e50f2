"""Spectral per-band experts (issue 14, the Tessera seed's "experts operating per frequency band"):
``bands: B`` splits the F rfft bins into B contiguous groups, each routed only among its E / B
experts, alongside the band-aware router input. The mask by hand, routing that never leaves a
band, and the generated program against the reference (outputs, aux loss, every gradient)."""

import pytest
import torch

import moec
from moec.backends.reference import routing
from moec.backends.torch import snippets
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with


def test_band_mask_by_hand():
    logits = torch.zeros(1, 5, 6)  # F = 5 bins, E = 6 experts, 2 bands: bins 0-2 -> experts 0-2, bins 3-4 -> experts 3-5
    allowed = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 1, 1]] * 2, dtype=torch.bool)
    expected = torch.where(allowed, 0.0, float("-inf"))[None]
    assert torch.equal(routing.band_mask(None, {"bands": 2}, logits), expected)
    assert torch.equal(snippets.band_mask(logits, 2), expected)
    three = routing.band_mask(None, {"bands": 3}, torch.zeros(2, 7, 6))  # floor(f * 3 / 7): groups 0,0,0,1,1,2,2
    assert [row.isfinite().nonzero().flatten().tolist() for row in three[1]] == [[0, 1]] * 3 + [[2, 3]] * 2 + [[4, 5]] * 2
    assert torch.equal(snippets.band_mask(torch.zeros(2, 7, 6), 3), three)


def test_every_bin_routes_inside_its_band():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 8) * 5
    scores = torch.softmax(snippets.band_mask(logits, 4), dim=-1)
    _, chosen = snippets.select_experts(scores.reshape(-1, 8), 2)
    group = (torch.arange(9) * 4 // 9).repeat(4)  # each bin's band, per (batch, bin) row
    assert torch.equal(chosen // 2, group[:, None].expand(-1, 2))
    assert torch.all(scores.reshape(-1, 8).gather(-1, chosen) > 0)


def bands_spec(name: str, band: str, extra: str = "", depth: int = 2):
    layer = f"""        - kind: spectral_moe
          depth: {depth}
          band: {band}
          bands: 2
{extra}          moe: {{experts: 4, top_k: 2, expert: {{hidden: 8, activation: gelu}}, aux: {{load_balance: 0.01, z_loss: 0.01}}}}
"""
    return spec_with(layer, name=name, tokens=False)


VARIANTS = {"embedding": ("embedding", ""), "index_feature_no_residual": ("index_feature", "          residual: false\n"),
            "none_depth1": ("none", "")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bands_agree_with_the_reference(variant):
    band, extra = VARIANTS[variant]
    spec = bands_spec(variant, band, extra, depth=1 if "depth1" in variant else 2)
    program = moec.compile_spec(spec)
    assert "band_mask(logits.view(batch, seq, -1), 2)" in program.source
    assert_agree(spec, seeds=(0, 3), shapes=((2, 16), (1, 3), (2, 9)))


def test_bands_change_the_routing():
    spec = bands_spec("b", "embedding")
    free_spec = moec.load_spec_text(spec.source.text.replace("          bands: 2\n", ""), file="free.yaml")
    banded, free = moec.build_model(spec).eval(), moec.build_model(free_spec).eval()
    free.load_state_dict(banded.state_dict())
    inputs = banded.example_inputs(batch=2, seq=16)
    assert (banded(*inputs).output - free(*inputs).output).abs().max() > 1e-4
