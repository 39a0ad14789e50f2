"""Property: whatever a user writes, moec answers with a Spec or a located SpecError, never a crash."""

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moec
from tests.conftest import SPEC_FILES

BASES = [yaml.safe_load(path.read_text()) for path in SPEC_FILES]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["topk", "sinkhorn", "dp", "ep", "tp", "moe", "attention", "bf16"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _paths(child, prefix + (index,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(BASES), data=st.data(), value=values, delete=st.booleans())
def test_mutated_specs_never_crash(base, data, value, delete):
    spec = copy.deepcopy(base)
    path = data.draw(st.sampled_from([p for p in _paths(spec) if p]))
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    text = yaml.safe_dump(spec)
    try:
        moec.load_spec_text(text, file="fuzz.yaml")
    except moec.SpecError as err:
        for issue in err.issues:
            assert issue.file == "fuzz.yaml" and issue.line is not None and issue.message
