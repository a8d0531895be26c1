import math
from pathlib import Path

import pytest

from alignforge.errors import AlignforgeError
from alignforge.recipe_yaml import RecipeYAMLError, load_scalar, load_yaml
from schemas import SchemaError


def test_on_off_yes_no_keys_and_values_stay_strings():
    data = load_yaml("minhash:\n  on: conversation\n  off: 1\nyes: no\ny: n\n", source="r.yaml")
    assert data == {"minhash": {"on": "conversation", "off": 1}, "yes": "no", "y": "n"}
    assert load_yaml("steps:\n  - minhash: {on: instruction, enabled: true}\n") == {
        "steps": [{"minhash": {"on": "instruction", "enabled": True}}]}


def test_yaml_1_2_scalars():
    data = load_yaml("a: true\nb: False\nc: null\nd: ~\ne:\nf: 012\ng: 0x1F\nh: 0o17\ni: 1e-3\nj: -2.5\n"
                     "k: .inf\nl: 1:30\nm: 2024-01-02\nn: 1_000\no: '0.8'\np: .nan\n")
    assert data["a"] is True and data["b"] is False and data["c"] is data["d"] is data["e"] is None
    assert (data["f"], data["g"], data["h"]) == (12, 31, 15)  # decimal, not YAML 1.1 octal
    assert data["i"] == 0.001 and data["j"] == -2.5 and data["k"] == math.inf and math.isnan(data["p"])
    assert data["l"] == "1:30" and data["m"] == "2024-01-02" and data["n"] == "1_000" and data["o"] == "0.8"


def test_duplicate_key_is_one_error_naming_key_and_lines():
    text = "name: demo\nsteps:\n  - minhash:\n      threshold: 0.8\n      threshold: 0.9\n"
    with pytest.raises(RecipeYAMLError, match=r"^my.yaml line 5: key 'threshold' appears twice in one mapping "
                                              r"\(first at line 4\).*Fix: keep one 'threshold' entry"):
        load_yaml(text, source="my.yaml")
    with pytest.raises(RecipeYAMLError, match=r"line 3: key 'seed' appears twice \S* ?.*first at line 1"):
        load_yaml("seed: 1\nn: 2\nseed: 3\n")
    # the same key in different mappings is fine
    assert load_yaml("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


def test_merge_keys_still_override():
    data = load_yaml("base: &b {temperature: 0.8, top_p: 1.0}\nrun:\n  <<: *b\n  temperature: 0.0\n")
    assert data["run"] == {"temperature": 0.0, "top_p": 1.0}


def test_boolean_or_null_key_is_refused():
    with pytest.raises(RecipeYAMLError, match=r"line 2: key 'true' reads as True, not as a name.*Fix: quote it"):
        load_yaml("a: 1\ntrue: 2\n")
    with pytest.raises(RecipeYAMLError, match=r"key 'null' reads as None"):
        load_yaml("null: 2\n")
    assert load_yaml("'true': 2\n") == {"true": 2}


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("just text\n", "a single string"),
                                        ("3\n", "a number"), ("true\n", "a boolean")])
def test_top_level_must_be_a_mapping(text, kind):
    with pytest.raises(RecipeYAMLError, match=rf"^r.yaml: the top level is {kind}, not a mapping.*Fix: write"):
        load_yaml(text, source="r.yaml")


def test_empty_file_is_an_empty_mapping(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_yaml(tmp_path / "empty.yaml") == {} and load_yaml("") == {}


def test_syntax_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps:\n  - minhash: {threshold: 0.8\nseed: 1\n")
    with pytest.raises(RecipeYAMLError, match=rf"^{path} line 3 column \d+: .*Fix: fix the YAML"):
        load_yaml(path)
    with pytest.raises(RecipeYAMLError, match=r"line 1 .*a key is a list or mapping"):
        load_yaml("? [a, b]\n: 1\n")


def test_file_errors(tmp_path):
    with pytest.raises(RecipeYAMLError, match=r"missing.yaml: file not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(RecipeYAMLError, match=r"is a folder"):
        load_yaml(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeYAMLError, match=r"not UTF-8"):
        load_yaml(Path(tmp_path / "latin1.yaml"))


def test_errors_are_schema_errors_the_cli_catches():
    with pytest.raises(SchemaError):
        load_yaml("a: 1\na: 2\n")
    assert issubclass(RecipeYAMLError, AlignforgeError) and issubclass(RecipeYAMLError, ValueError)


def test_load_scalar_for_set_values():
    assert load_scalar("on", source="--set minhash.on") == "on"
    assert load_scalar("yes") == "yes" and load_scalar("true") is True and load_scalar("0.8") == 0.8
    assert load_scalar("[1, 2]") == [1, 2] and load_scalar("") is None and load_scalar("{on: x}") == {"on": "x"}
    with pytest.raises(RecipeYAMLError, match=r"^--set x line 1: key 'a' appears twice"):
        load_scalar("{a: 1, a: 2}", source="--set x")
