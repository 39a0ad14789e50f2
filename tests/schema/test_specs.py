"""Every bundled spec validates, resolves to a stable form, and matches its seed's numbers."""

import pytest
import moec
from moec.schema import resolved_yaml
from moec.schema.checks import estimate_params
from tests.conftest import SPEC_FILES

SPEC_IDS = [path.stem for path in SPEC_FILES]


def test_every_seed_family_has_a_spec():
    assert set(SPEC_IDS) >= {
        "spectral_moe", "gpt_oss_120b", "gpt_oss_tiny", "moe_basics", "moe_basics_tiny",
        "signals_sinkhorn", "token_routed", "token_routed_tiny",
    }


@pytest.mark.parametrize("path", SPEC_FILES, ids=SPEC_IDS)
def test_spec_validates_and_resolved_form_is_stable(path, snapshot):
    spec = moec.load_spec(path.relative_to(path.parent.parent))
    assert spec.name == path.stem
    text = resolved_yaml(spec)
    assert text == snapshot
    # The resolved form is itself a valid spec that resolves to the same thing.
    again = moec.load_spec_text(text, file="resolved.yaml")
    assert again.model_dump() == spec.model_dump()


@pytest.mark.parametrize(
    "name, params_billions",
    [("gpt_oss_120b", 120.908), ("moe_basics", 46.703), ("token_routed", 18.269)],
)
def test_full_size_parameter_counts(name, params_billions):
    # gpt_oss_120b: 96 x (4 x 12288^2 + 3 x 12288 x 16384) + 2 x 201088 x 12288 + norms (one weight
    # vector per rmsnorm: the estimate is exact, tests/hostile/test_bounds.py checks it per spec).
    # moe_basics is Mixtral 8x7B's shape, published at 46.7B parameters.
    # token_routed: 18.248B of attention + MoE, and 16 x 1.327M of INL dynamics (mu, controller 8192 -> 64 -> 12288).
    spec = moec.load_spec(f"specs/{name}.yaml")
    assert estimate_params(spec) / 1e9 == pytest.approx(params_billions, abs=5e-4)


def test_spectral_spec_matches_the_seed():
    spec = moec.load_spec("specs/spectral_moe.yaml")
    layer = spec.model.blocks[0].layers[0]
    assert (layer.kind, layer.moe.experts, layer.moe.top_k, layer.depth) == ("spectral_moe", 16, 2, 3)
    assert spec.sharding.experts == ["ep"] and spec.sharding.batch == ["dp"]


def test_gpt_oss_mesh_is_tp8_pp6_dp4():
    spec = moec.load_spec("specs/gpt_oss_120b.yaml")
    assert spec.mesh.axes == {"tp": 8, "pp": 6, "dp": 4} and spec.mesh.world_size == 192
    assert (spec.schedule.precision.compute, spec.schedule.precision.accumulate) == ("bf16", "fp32")
    assert spec.model.num_layers == 96


def test_loaded_spec_is_frozen_and_remembers_its_source():
    spec = moec.load_spec("specs/token_routed_tiny.yaml")
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"
    assert spec.source.file == "specs/token_routed_tiny.yaml"
    assert spec.source.locate(("model", "blocks", 0, "layers", 1, "experts")) == (21, 20)  # "          experts: 4"
