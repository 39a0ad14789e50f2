"""YAML loading: marks, safety limits, and the cases PyYAML gets wrong by default."""

import pytest

from moec.schema.errors import SpecError
from moec.schema.loader import MAX_FILE_BYTES, load_yaml_file, load_yaml_text


def test_marks_point_at_values_and_keys():
    loaded = load_yaml_text("a:\n  b: [1, 2]\n  c: {d: x}\n", file="f.yaml")
    assert loaded.data == {"a": {"b": [1, 2], "c": {"d": "x"}}}
    assert loaded.locate(("a", "b", 1)) == (2, 10)
    assert loaded.locate(("a", "c", "d")) == (3, 10)
    assert loaded.locate(("a", "c", "d"), at_key=True) == (3, 7)
    # A key missing from the file is located at its nearest existing parent's key.
    assert loaded.locate(("a", "c", "missing")) == (3, 3)


@pytest.mark.parametrize("text, value", [("x: 1e-5", 1e-5), ("x: 3E+2", 300.0), ("x: 1.0e-3", 1e-3), ("x: 12", 12), ("x: '1e-5'", "1e-5")])
def test_exponent_floats_without_a_dot_are_floats(text, value):
    loaded = load_yaml_text(text)
    assert loaded.data["x"] == value and type(loaded.data["x"]) is type(value)


def test_all_duplicate_keys_are_reported():
    with pytest.raises(SpecError) as caught:
        load_yaml_text("a: 1\nb: 2\na: 3\nc:\n  d: 1\n  d: 2\n", file="f.yaml")
    assert [str(issue) for issue in caught.value.issues] == [
        "f.yaml:3:1: a: duplicate key 'a' (first defined at line 1)",
        "f.yaml:6:3: c.d: duplicate key 'd' (first defined at line 5)",
    ]


def test_recursive_alias_is_rejected():
    with pytest.raises(SpecError, match="alias bomb or recursive alias"):
        load_yaml_text("a: &a [*a]\n")


def test_oversized_file_is_rejected_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "1" * (MAX_FILE_BYTES + 1))
    with pytest.raises(SpecError, match=r"larger than the 1048576-byte limit"):
        load_yaml_file(big)


def test_unreadable_files_give_one_clean_issue(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    for path, message in [(tmp_path / "none.yaml", "no such file"), (tmp_path, "is a directory"), (tmp_path / "bin.yaml", "not UTF-8")]:
        with pytest.raises(SpecError) as caught:
            load_yaml_file(path)
        assert len(caught.value.issues) == 1 and message in str(caught.value)


def test_object_constructing_tags_never_run(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(SpecError, match="is not allowed"):
        load_yaml_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()
