"""Read recipe YAML the way a person means it: YAML 1.2 scalars, no duplicate keys, a mapping on top.

    from alignforge.recipe_yaml import load_yaml, load_scalar, RecipeYAMLError
    recipe = load_yaml(Path("my_recipe.yaml"))                 # a file (pathlib.Path / os.PathLike)
    recipe = load_yaml("steps: [...]", source="--recipe-text")  # text (a str)
    value = load_scalar("on", source="--set minhash.on")       # a --set value: "on" stays "on"

PyYAML reads YAML 1.1, where `on`, `off`, `yes`, `no`, `y`, `n` are booleans: the key of
`on: conversation` (MinHash's field) becomes True and the value `on` becomes True; `1:30` is the
integer 90, `012` is octal 10 and `2024-01-02` a date. This loader resolves plain scalars by the
YAML 1.2 core schema instead: only true/false are booleans, only null/~/empty is null, integers
are decimal (or 0o / 0x), floats include `1e-3`, everything else is a string. A key given twice
in one mapping is an error naming the key and both lines (PyYAML keeps the last one silently);
merge keys (`<<: *defaults`) still override as YAML intends. A boolean or null KEY (`true:`,
`null:`) is an error, since no recipe field has such a name. Every error is a RecipeYAMLError
(a schemas.SchemaError, so the CLI prints it as one line and exits 2) naming the source and line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from schemas import SchemaError


class RecipeYAMLError(SchemaError):
    """A recipe file that cannot be read as meant: names the source, line and key, and the fix."""


_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema for plain scalars and duplicate-key detection."""

    yaml_implicit_resolvers: dict = {}


# Start from no implicit resolvers at all (SafeLoader's are YAML 1.1), then add the 1.2 core ones.
_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.add_implicit_resolver(_MERGE_TAG, re.compile(r"^(?:<<)$"), ["<"])


def _construct_bool(loader: _Loader, node: ScalarNode) -> bool:
    return loader.construct_scalar(node).lower() == "true"


def _construct_int(loader: _Loader, node: ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)


def _construct_float(loader: _Loader, node: ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith("inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text.endswith("nan"):
        return math.nan
    return float(text)


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _construct_mapping(loader: _Loader, node: MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, bool) or key is None:
            raise RecipeYAMLError(
                f"{loader.source} line {line}: key {key_node.value!r} reads as {key!r}, not as a name",
                fix=f"quote it (\"{key_node.value}\": ...) or use the field's name")
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable (list / mapping) key: PyYAML reports it below
            continue
        if first is not None:
            raise RecipeYAMLError(
                f"{loader.source} line {line}: key {key!r} appears twice in one mapping (first at line {first}); "
                f"YAML would silently keep only the last one",
                fix=f"keep one {key!r} entry (merge their values into it)")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_yaml_map(loader: _Loader, node: MappingNode):
    data: dict = {}
    yield data
    data.update(_construct_mapping(loader, node))


_Loader.construct_mapping = _construct_mapping  # type: ignore[assignment]
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)


def _read(path_or_text: str | os.PathLike, source: str | None) -> tuple[str, str]:
    if isinstance(path_or_text, os.PathLike):
        path = Path(path_or_text)
        label = source or str(path)
        try:
            return path.read_text(encoding="utf-8"), label
        except FileNotFoundError:
            raise RecipeYAMLError(f"{label}: file not found", fix="check the path (relative paths start at the "
                                  "folder you run alignforge from)") from None
        except IsADirectoryError:
            raise RecipeYAMLError(f"{label}: is a folder, not a YAML file", fix="pass the recipe's .yaml file") from None
        except UnicodeDecodeError as exc:
            raise RecipeYAMLError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                                  fix="save the file as UTF-8") from None
        except OSError as exc:
            raise RecipeYAMLError(f"{label}: cannot be read ({exc.strerror})", fix="check its permissions") from None
    if not isinstance(path_or_text, str):
        raise TypeError(f"load_yaml: expected a str (YAML text) or a path, got {type(path_or_text).__name__}")
    return path_or_text, source or "<yaml text>"


def _parse(text: str, label: str) -> Any:
    loader = _Loader(text)
    loader.source = label
    try:
        return loader.get_single_data()
    except RecipeYAMLError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if isinstance(exc, ConstructorError) and "unhashable" in str(problem):
            problem = "a key is a list or mapping; keys must be names"
        raise RecipeYAMLError(f"{label}{where}: {problem}",
                              fix="fix the YAML there (indent with spaces, quote values containing ': ' or '#')") from None
    except yaml.YAMLError as exc:
        raise RecipeYAMLError(f"{label}: {exc}", fix="fix the YAML syntax") from None
    finally:
        loader.dispose()


def load_yaml(path_or_text: str | os.PathLike, *, source: str | None = None) -> dict[str, Any]:
    """The top-level mapping of a recipe YAML file (a Path) or YAML text (a str); {} when empty.

    `source` names it in errors (default: the path, or "<yaml text>"). Raises RecipeYAMLError
    for syntax errors, duplicate keys, true/false/null keys and a top level that is not a mapping."""
    text, label = _read(path_or_text, source)
    data = _parse(text, label)
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a single string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(data), type(data).__name__)
        raise RecipeYAMLError(f"{label}: the top level is {kind}, not a mapping of keys",
                              fix="write `key: value` lines at the top level (e.g. `steps:` with the step list "
                                  "under it)")
    return data


def load_scalar(text: str, *, source: str | None = None) -> Any:
    """One YAML value (a `--set key=value` value) read with the same rules; "" -> None."""
    if not text.strip():
        return None
    return _parse(text, source or "<value>")
