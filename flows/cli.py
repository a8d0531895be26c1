"""`alignforge` command line: run recipes, inspect datasets, prepare the embedded model.

User errors (unknown recipe, bad --set key or value, unwritable --out, unusable model) are one
line on stderr and exit code 2; --verbose shows tracebacks and Prefect's / vLLM's own logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


# ---------------------------------------------------------------- environment

def configure_environment(verbose: bool) -> None:
    """Prefect in local ephemeral mode (no server to start), quiet unless --verbose.

    Must run before prefect / vllm are imported: both read these at import time."""
    home = os.environ.get("PREFECT_HOME")
    if not home:
        from engines.embedded import cache_dir

        home = str(cache_dir() / "prefect")
        os.environ["PREFECT_HOME"] = home
    os.environ.setdefault("PREFECT_MEMO_STORE_PATH", os.path.join(home, "memo_store.toml"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The in-process ephemeral API server needs more than Prefect's 20 s on a busy shared CPU box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", level)
    if not verbose:
        # A failing flow is reported once by us (one line), not as Prefect's traceback too.
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- params

def parse_set(items: list[str]) -> dict[str, Any]:
    """["a=1", "deita.budget=6000"] -> {"a": 1, "deita": {"budget": 6000}}; values are YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected key=value (e.g. --set n=50)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {key}: can't parse value {raw!r} as YAML ({str(exc).splitlines()[0]})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {part!r} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def _valid_keys(model: type, prefix: str = "") -> list[str]:
    return [key for key, *_ in _flat_fields(model, prefix)]


def check_keys(model: type, values: dict[str, Any], *, source: str, prefix: str = "") -> None:
    """Unknown keys -> UsageError listing the valid ones (nested sections with dots)."""
    from pydantic import BaseModel

    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            raise UsageError(f"{source}: unknown key {prefix + key!r}; valid keys: {', '.join(_valid_keys(model, prefix))}")
        ann = field.annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            check_keys(ann, value, source=source, prefix=f"{prefix}{key}.")


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_type(model: type, loc: tuple) -> str:
    from pydantic import BaseModel

    current: Any = model
    ann: Any = None
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            break
        ann = current.model_fields[part].annotation
        current = ann
    if ann is None:
        return "?"
    return getattr(ann, "__name__", None) if isinstance(ann, type) else str(ann).replace("typing.", "")


def build_params(name: str, params_model: type, default_yaml: Path, recipe_file: str | None,
                 sets: list[str], out: str | None):
    import yaml
    from pydantic import ValidationError

    values: dict[str, Any] = {}
    for path, label in ((default_yaml, f"recipe {name} defaults ({default_yaml})"), (recipe_file, f"--recipe {recipe_file}")):
        if path is None:
            continue
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UsageError(f"--recipe {path}: file not found") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"{label}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{label}: expected a mapping of parameter: value, got {type(loaded).__name__}")
        loaded = loaded.get("params", loaded) if set(loaded) <= {"recipe", "params"} else loaded
        loaded = {k: v for k, v in loaded.items() if k != "recipe"}
        check_keys(params_model, loaded, source=label)
        values = _merge(values, loaded)
    overrides = parse_set(sets)
    check_keys(params_model, overrides, source="--set")
    values = _merge(values, overrides)
    if out is not None:
        if "out" not in params_model.model_fields:
            raise UsageError(f"recipe {name} has no output folder parameter; drop --out")
        values["out"] = out
    try:
        return params_model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"parameter {key}={err.get('input')!r}: expected {_field_type(params_model, tuple(err['loc']))} "
                         f"({err['msg']}); fix it with --set {key}=...") from None


def check_writable(out: str) -> None:
    if "://" in out and not out.startswith("file://"):
        return  # fsspec URL: the storage layer reports its own errors
    path = Path(out.removeprefix("file://")).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".alignforge-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: can't write there ({exc.strerror or exc}). Fix: pick a folder you can "
                         "write to, e.g. --out runs/my-run") from None


def preflight_model(model: str | None) -> None:
    """Fail before Prefect / vLLM start: missing or corrupt model folder, no chat template."""
    from engines.chat_template import pre_query_prefix
    from engines.embedded import resolve_model

    path = resolve_model(model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds; the user needs where and what
        from engines.embedded import ModelError

        raise ModelError(f"model {model or path}: can't load its tokenizer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}). Fix: point --set model= at a complete "
                         "Hugging Face model folder with tokenizer files") from None
    pre_query_prefix(tokenizer)


# ---------------------------------------------------------------- commands

def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UsageError]
    try:
        from engines.embedded import ModelError

        errors.append(ModelError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from engines.chat_template import ChatTemplateError

        errors.append(ChatTemplateError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from schemas import SchemaError

        errors.append(SchemaError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.recipes import RECIPES, recipe

    if args.recipe_name not in RECIPES:
        raise UsageError(f"unknown recipe {args.recipe_name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    flow_fn, params_model, default_yaml = recipe(args.recipe_name)
    params = build_params(args.recipe_name, params_model, default_yaml, args.recipe, args.set or [], args.out)
    if hasattr(params, "out"):
        check_writable(params.out)
    if "model" in params_model.model_fields:
        preflight_model(params.model)
    started = time.perf_counter()
    result = flow_fn(params)
    wall = time.perf_counter() - started
    print_result(args.recipe_name, result, wall)
    return 0


def print_result(name: str, result: Any, wall: float) -> None:
    if not isinstance(result, dict):
        print(f"{name}: done in {wall:.1f}s")
        return
    drops = ", ".join(f"{k} {v}" for k, v in (result.get("dropped") or {}).items()) or "none"
    dataset = result.get("dataset")
    print(f"\n{name}: done in {wall:.1f}s")
    if dataset:
        print(f"  dataset: {dataset}   (datasets.load_dataset('parquet', data_dir='{dataset}'))")
    if "rows_kept" in result:
        of = f" of {result['rows_requested']}" if "rows_requested" in result else ""
        print(f"  rows: {result['rows_kept']} kept{of}; dropped: {drops}")
    if result.get("generated_tokens"):
        print(f"  generation: {result['generated_tokens']} tokens in {result.get('generation_seconds', 0):.1f}s "
              f"= {result.get('tokens_per_second', 0):.1f} tokens/s")


def cmd_inspect(args: argparse.Namespace) -> int:
    import storage

    if "://" not in args.path and not Path(args.path).exists():
        raise UsageError(f"inspect: {args.path} does not exist")
    report = storage.inspect_dataset(args.path)
    if isinstance(report, str):
        print(report)
    else:
        print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from engines.embedded import prepare_embedded_model

    path = prepare_embedded_model(force=args.force)
    print(f"embedded model ready: {path}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from pydantic_core import PydanticUndefined

    from flows.recipes import RECIPES, recipe

    for name in sorted(RECIPES):
        try:
            flow_fn, params_model, default_yaml = recipe(name)
        except Exception as exc:  # one broken recipe must not hide the others
            print(f"{name}: (can't load: {type(exc).__name__}: {exc})")
            continue
        doc = (getattr(flow_fn, "description", None) or getattr(flow_fn, "__doc__", None) or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        print(f"  defaults: {default_yaml}")
        for key, type_name, default, description in _flat_fields(params_model):
            shown = "required" if default is PydanticUndefined else f"default {default!r}"
            print(f"  --set {key}=...  ({type_name}, {shown})" + (f"  {description}" if description else ""))
    return 0


def _flat_fields(model: type, prefix: str = "") -> list[tuple[str, str, Any, str | None]]:
    """(dotted key, type, default, description) for every leaf field; nested sections flattened."""
    from pydantic import BaseModel

    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _flat_fields(ann, f"{prefix}{name}.")
        else:
            default = field.default_factory() if field.default_factory is not None else field.default
            rows.append((prefix + name, _field_type(model, (name,)), default, field.description))
    return rows


def build_parser() -> argparse.ArgumentParser:
    from flows.recipes import RECIPES

    parser = argparse.ArgumentParser(
        prog="alignforge",
        description="Turn language models into alignment datasets (Prefect flows over vLLM).",
        epilog=(f"recipes: {', '.join(sorted(RECIPES))}   (details: alignforge recipes)\n"
                "example: alignforge run magpie-sft --set n=50 --set turns=1 --out runs/demo"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", "-v", action="store_true", help="tracebacks and Prefect / vLLM logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe", description="Run a recipe (a Prefect flow) locally.",
                         epilog=f"recipes: {', '.join(sorted(RECIPES))}")
    run.add_argument("recipe_name", metavar="RECIPE", help=f"one of: {', '.join(sorted(RECIPES))}")
    run.add_argument("--recipe", metavar="FILE.yaml", help="parameter file (overrides the recipe defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override one parameter (YAML scalar; nested keys with dots: deita.budget=6000)")
    run.add_argument("--out", metavar="DIR", help="run folder (the dataset is published to DIR/publish)")
    run.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="summarise a dataset folder (rows, columns, drops, lineage)")
    inspect.add_argument("path", metavar="DIR")
    inspect.set_defaults(func=cmd_inspect)

    model = sub.add_parser("model", help="manage the embedded model")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    prepare = model_sub.add_parser("prepare", help="convert the embedded GGUF to a safetensors folder (once)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if it exists")
    prepare.set_defaults(func=cmd_model_prepare)

    recipes = sub.add_parser("recipes", help="list recipes and their parameters")
    recipes.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or "-v" in argv
    configure_environment(verbose)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        return 0
    except KeyboardInterrupt:
        print("alignforge: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        if verbose:
            raise
        print(f"alignforge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if verbose:
            raise
        print(f"alignforge: unexpected error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
