"""Recipes are data: a YAML file naming a model, a list of steps with their configs, and a publish
section. Built-in recipes are such files (flows/recipes/*.yaml); users write their own.

    name: my-sft
    model: embedded              # or an HF folder / hub id, or {openai: [url, ...], name: served-name}
    steps:
      - magpie_instructions: {n: 32, temperature: 1.0}
      - magpie_responses: {max_tokens: 256}
      - heuristics: {}
      - minhash: {threshold: 0.8}
      - deita: {budget: 16}
    publish: {format: sft, test_size: 0.0}

A step entry is `{step_name: {config}}` (its pydantic config is the only definition of a field and
its default; `enabled: false` skips a step). Run-level keys: `seed` (given to every step config
with a `seed` field the entry does not set), `shard_size`, `input` (rows to start from, read
with schemas.mapping.load_rows), `publish`, and `params`: short names for `--set`
(`n: steps.magpie_instructions.n`; a list sets several fields; a path without a field, e.g.
`reward: steps.reward_label`, makes `--set reward.model=...` reach that step).

`--set` keys: `steps.<step>.<field>`, `<step>.<field>`, a `params` short name, or a run-level key.
Every mistake (unknown step / field / key, wrong type) is one `RecipeError` naming the file, the
step, the field and the valid choices, raised before any model starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignforge.errors import AlignforgeError

RECIPE_DIR = Path(__file__).parent / "recipes"
RUN_KEYS = ("name", "description", "model", "seed", "shard_size", "rows_in_flight", "input", "steps", "publish", "params", "out")


class RecipeError(AlignforgeError, ValueError):
    """A mistake in a recipe file or a --set override: one line, exit 2."""


class InputSpec(BaseModel):
    """Rows a recipe starts from (instead of a generator step): read with schemas.mapping.load_rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str | None = Field(None, description="parquet / jsonl / json file or folder, our published folder or a stage folder")
    mapping: dict[str, str] | None = Field(None, description="{our_column: their_column}, e.g. {instruction: question}")
    kind: Literal["sft", "instructions", "preference"] = Field("sft", description="how the rows are read")


class ConfigSpec(BaseModel):
    """One extra published config: the kept rows of a step, optionally filtered and projected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    step: str = Field(..., description="step whose kept rows this config holds")
    where: dict[str, Any] | None = Field(None, description="{column: value} rows must match")
    columns: list[str] | None = Field(None, description="columns to publish (None: all but internal ones)")


class PublishSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal["sft", "preference", "candidates", "instructions", "rows"] = Field(
        "sft", description="layout of the default config (TRL SFT `messages`, preference pairs, candidate sets...)")
    columns: list[str] | None = Field(None, description="columns of the default config (None: all but internal ones)")
    where: dict[str, Any] | None = Field(None, description="{column: value} the default config's rows must match")
    test_size: float = Field(0.0, ge=0.0, lt=1.0, description="held-out share (test split by hashed id)")
    margin: float = Field(0.0, ge=0.0, description="preference: keep pairs with score_chosen - score_rejected > margin")
    configs: dict[str, ConfigSpec] = Field(default_factory=dict, description="extra named configs")
    title: str | None = None
    method: str | None = Field(None, description="one line for the dataset card (paper, method)")


class StepSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True


class Recipe(BaseModel):
    """A validated recipe. `steps` configs are plain dicts, validated against each step's Config."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    description: str = ""
    model: str | dict[str, Any] | None = Field(None, description="chat model for generating steps (None = embedded)")
    seed: int = 0
    shard_size: int = Field(64, ge=1, description="rows per shard: the unit of resume and of one step call")
    rows_in_flight: int = Field(256, ge=1, description="rows an engine step keeps in flight: ceil(rows_in_flight / "
                                "shard_size) shards run at once and share the engine's batch (continuous "
                                "batching across shard boundaries); each shard is still committed on its own")
    input: InputSpec | None = None
    steps: tuple[StepSpec, ...] = ()
    publish: PublishSpec = Field(default_factory=PublishSpec)
    params: dict[str, str | list[str]] = Field(default_factory=dict)
    out: str | None = None
    source: str = Field("", description="where the recipe was read from (for error messages)")

    def step(self, name: str) -> StepSpec:
        return next(s for s in self.steps if s.name == name)

    def enabled_steps(self) -> list[StepSpec]:
        return [s for s in self.steps if s.enabled]


# ---------------------------------------------------------------- reading

def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file (the `name:` inside each file)."""
    found = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        found[path.stem.replace("_", "-")] = path
    return found


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{source}: file not found. Fix: give a recipe file path or one of the built-in "
                          f"recipes: {', '.join(builtin_recipes())}") from None
    try:
        from alignforge.recipe_yaml import load_yaml
    except ImportError:  # pragma: no cover - older checkout
        import yaml

        def load_yaml(text, *, source):
            return yaml.safe_load(text)
    data = load_yaml(text, source=source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping (name, model, steps, publish), got {type(data).__name__}")
    return data


def resolve_recipe_path(ref: str) -> Path:
    """A built-in recipe name or a path to a YAML file."""
    builtins = builtin_recipes()
    if ref in builtins:
        return builtins[ref]
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    raise RecipeError(f"unknown recipe {ref!r}; built-in recipes: {', '.join(sorted(builtins))} "
                      "(or give a path to a recipe .yaml file)")


def load_recipe(ref: str | Path, *, sets: list[str] | dict[str, Any] | None = None, out: str | None = None,
                overlay: str | Path | None = None) -> Recipe:
    """Read a recipe (built-in name or file), apply an overlay file and `--set` overrides, validate
    every step config. Raises RecipeError with file / step / field / choices."""
    path = resolve_recipe_path(str(ref))
    source = str(path)
    raw = _read_yaml(path, source)
    if overlay is not None:
        over = _read_yaml(Path(overlay), str(overlay))
        raw = apply_overrides(raw, _flatten(over), source=str(overlay))
    if sets:
        pairs = parse_sets(sets) if isinstance(sets, list) else list(_flatten(sets))
        raw = apply_overrides(raw, pairs, source="--set")
    if out is not None:
        raw["out"] = out
    return validate_recipe(raw, source=source)


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("model",) and not (prefix == "" and key == "params"):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def parse_sets(items: list[str]) -> list[tuple[str, Any]]:
    """["n=50", "steps.minhash.threshold=0.7"] -> [(key, YAML scalar value), ...]."""
    import yaml

    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key=value (e.g. --set n=50)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {key}: can't parse value {raw!r} as YAML ({str(exc).splitlines()[0]})") from None
        pairs.append((key, value))
    return pairs


def _step_entries(raw: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """Normalise `steps:` to [{"name", "config", "enabled"}] (validating the entry shape)."""
    entries = []
    for i, entry in enumerate(raw.get("steps") or []):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{source}: steps[{i}] must be one `step_name: {{config}}` mapping, got {entry!r}. "
                              "Fix: write e.g. `- minhash: {threshold: 0.8}`")
        (name, config), = entry.items()
        config = dict(config or {})
        if not isinstance(config, dict):
            raise RecipeError(f"{source}: step {name!r} config must be a mapping, got {config!r}")
        enabled = config.pop("enabled", True)
        entries.append({"name": str(name), "config": config, "enabled": enabled})
    return entries


def apply_overrides(raw: dict[str, Any], pairs: list[tuple[str, Any]], *, source: str) -> dict[str, Any]:
    """Set each dotted key in the raw recipe (aliases from `params` resolved first)."""
    raw = {**raw, "steps": _step_entries(raw, source)}
    raw["steps"] = [{e["name"]: {**e["config"], **({} if e["enabled"] is True else {"enabled": e["enabled"]})}}
                    for e in raw["steps"]]
    params = dict(raw.get("params") or {})
    step_names = [next(iter(e)) for e in raw["steps"]]
    for key, value in pairs:
        for target in _targets(key, params, step_names, source):
            _set(raw, target, value, source)
    return raw


def _targets(key: str, params: dict[str, Any], step_names: list[str], source: str) -> list[str]:
    head, _, rest = key.partition(".")
    if head in params:
        aliased = params[head]
        paths = aliased if isinstance(aliased, list) else [aliased]
        return [f"{p}.{rest}" if rest else p for p in paths]
    if head in step_names and rest:
        return [f"steps.{key}"]
    if head in RUN_KEYS and head not in ("steps", "params", "name"):
        return [key]
    if head == "steps":
        return [key]
    from flows.steps import STEPS

    hint = (f"step {head!r} is not in this recipe (its steps: {', '.join(step_names)})" if head in STEPS
            else f"valid keys: {', '.join(sorted(params))}" + (", " if params else "")
            + "steps.<step>.<field> or <step>.<field> for the steps " + ", ".join(step_names)
            + ", and the run keys " + ", ".join(k for k in RUN_KEYS if k not in ("steps", "params", "name")))
    raise RecipeError(f"{source}: unknown key {key!r}; {hint}")


def _set(raw: dict[str, Any], target: str, value: Any, source: str) -> None:
    parts = target.split(".")
    if parts[0] == "steps":
        if len(parts) < 3:
            raise RecipeError(f"{source}: {target!r} needs a field: steps.<step>.<field>=value")
        name, field = parts[1], parts[2:]
        matches = [e for e in raw["steps"] if next(iter(e)) == name]
        if not matches:
            names = [next(iter(e)) for e in raw["steps"]]
            raise RecipeError(f"{source}: {target!r}: the recipe has no step {name!r}; its steps: {', '.join(names)}")
        for entry in matches:  # a step used twice gets the value in both places
            node = entry[name] = dict(entry[name] or {})
            _set_path(node, field, value, source, target)
        return
    if parts[0] == "input" and len(parts) == 1 and not isinstance(value, dict):
        parts, value = ["input", "path"], value  # `--set input=file.jsonl` sets the path, keeps kind / mapping
    if parts[0] in ("input", "publish") and len(parts) > 1:
        node = raw.setdefault(parts[0], {}) or {}
        raw[parts[0]] = node = dict(node)
        _set_path(node, parts[1:], value, source, target)
        return
    _set_path(raw, parts, value, source, target)


def _set_path(node: dict[str, Any], parts: list[str], value: Any, source: str, target: str) -> None:
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError(f"{source}: {target!r}: {part!r} is set to a value and used as a section")
        else:
            child = node[part] = dict(child)
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- validating

def validate_recipe(raw: dict[str, Any], *, source: str) -> Recipe:
    from flows.steps import STEPS, step_class

    unknown = sorted(set(raw) - set(RUN_KEYS))
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key {unknown[0]!r}; valid keys: {', '.join(RUN_KEYS)}. "
                          "Step settings go under `steps:` (e.g. `- minhash: {threshold: 0.8}`)")
    entries = _step_entries(raw, source)
    seed = raw.get("seed", 0)
    specs = []
    for entry in entries:
        name = entry["name"]
        if name not in STEPS:
            close = _close(name, STEPS)
            raise RecipeError(f"{source}: unknown step {name!r}{close}; valid steps: {', '.join(sorted(STEPS))} "
                              "(alignforge steps lists their fields)")
        cls = step_class(name)
        config = dict(entry["config"])
        if "seed" in cls.Config.model_fields and "seed" not in config and isinstance(seed, int):
            config["seed"] = seed
        if entry["enabled"]:
            try:
                validated = cls.Config(**config)  # validated here: a mistake stops the run before any model starts
            except ValidationError as exc:
                raise RecipeError(_config_error(source, name, cls.Config, exc)) from None
            cls(validated).preflight()
        else:  # a switched-off step may lack what it needs to run (zipfit's target), not a valid name
            fields = list(cls.Config.model_fields)
            for key in config:
                if key not in fields:
                    raise RecipeError(f"{source}: step {name!r} has no field {key!r}{_close(key, fields)}; "
                                      f"valid fields: {', '.join(fields)}")
        specs.append({"name": name, "config": config, "enabled": bool(entry["enabled"])})
    if not specs and not raw.get("input"):
        raise RecipeError(f"{source}: the recipe has no steps and no input. Fix: add `steps:` "
                          "(alignforge steps lists them) or `input: {path: ...}`")
    first = next((s for s in specs if s["enabled"]), None)
    if first is not None and not raw.get("input") and not step_class(first["name"]).source:
        raise RecipeError(f"{source}: the first step {first['name']!r} needs input rows, and the recipe has no "
                          "`input:`. Fix: start with a generator (e.g. magpie_instructions) or set input: {path: ...} "
                          "(--set input=FILE)")
    body = {k: v for k, v in raw.items() if k not in ("steps",)}
    body.setdefault("name", Path(source).stem.replace("_", "-"))
    if body.get("model") == "embedded":
        body["model"] = None
    if isinstance(body.get("model"), dict):  # an OpenAI server fleet: checked before any step runs
        from engines.openai_client import check_spec

        check_spec(body["model"], source=f"{source}: model")
    try:
        return Recipe(**body, steps=tuple(StepSpec(**s) for s in specs), source=source)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"{source}: {key}={err.get('input')!r}: {err['msg']}. Fix: --set {key}=...") from None


def _close(name: str, choices) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _config_error(source: str, step: str, config_cls: type, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    fields = list(config_cls.model_fields)
    if not field:  # a check across fields (model validator)
        return f"{source}: step {step!r}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        return (f"{source}: step {step!r} has no field {field!r}{_close(field, fields)}; valid fields: "
                f"{', '.join(fields)}")
    info = config_cls.model_fields.get(str(err["loc"][0])) if err["loc"] else None
    expected = _type_name(info.annotation) if info is not None else "?"
    return (f"{source}: step {step!r} field {field}={err.get('input')!r}: expected {expected} ({err['msg']}). "
            f"Fix: --set steps.{step}.{field}=...")


def _type_name(ann: Any) -> str:
    return getattr(ann, "__name__", None) if isinstance(ann, type) else str(ann).replace("typing.", "")


def build_steps(recipe: Recipe) -> list[Any]:
    """Step instances of the enabled steps, configs validated (engines are handed over by the runner).

    The model's profile (engines.profiles) fills fields the recipe / --set left unset: explicit wins."""
    from engines.profiles import profile_for
    from flows.steps import step_class

    profile = profile_for(recipe.model)
    steps = []
    for spec in recipe.enabled_steps():
        cls = step_class(spec.name)
        applied = {k: v for k, v in profile.get(spec.name, {}).items()
                   if k in cls.Config.model_fields and k not in spec.config}
        config = {**applied, **spec.config}
        if "seed" in cls.Config.model_fields and "seed" not in config:
            config["seed"] = recipe.seed
        step = cls(cls.Config(**config))
        if applied:
            step.model_profile = (recipe.model, applied)  # named in the step's stats (the card)
        steps.append(step)
    return steps
