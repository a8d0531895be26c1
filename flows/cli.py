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

from alignforge.errors import AlignforgeError

EXIT_USAGE = 2
DEFAULT_API = "http://127.0.0.1:4200/api"  # where `prefect server start` listens


class UsageError(AlignforgeError):
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
    # Quiet = progress bars, per-step lines and the result only. vLLM's own logger (stdout, in the
    # engine's worker processes too: they inherit this environment) prints ~25 WARNING lines per run
    # about this box (no Triton / libtcmalloc, eager mode, chunked prefill, shutdown kills), none of
    # which the user can act on; errors still show. --verbose: everything at INFO.
    level = "INFO" if verbose else "ERROR"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", level)
    if not verbose:
        # A failing flow is reported once by us (one line), not as Prefect's traceback too.
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")  # vLLM sets up its logger, at our level
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        # vLLM's import-time notices (Triton backend) reach the root handler before vLLM sets up its
        # logger; torch's C++ NUMA notice and library FutureWarnings go straight to stderr: quiet all three,
        # in engine worker processes too (they inherit the environment).
        import logging

        logging.getLogger("vllm").setLevel(logging.ERROR)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

def cmd_run(args: argparse.Namespace) -> int:
    from flows.recipe import load_recipe
    from flows.runner import run_recipe

    recipe = load_recipe(args.recipe_name, sets=args.set or [], out=args.out, overlay=args.recipe)
    import storage

    out = storage.check_run_folder(recipe.out if recipe.out is not None else f"runs/{recipe.name}")
    storage.check_publish_target(f"{out}/publish")
    check_writable(out)
    if any(_needs_chat_model(spec.name) for spec in recipe.enabled_steps()) and not isinstance(recipe.model, dict):
        preflight_model(recipe.model)
    if args.executor != "local":  # the package, a real Prefect server: before the lock, Prefect or Ray start
        from flows.executors import check_prefect_server, require_ray

        if args.executor == "ray":
            require_ray()
        check_prefect_server(os.environ.setdefault("PREFECT_API_URL", DEFAULT_API), f"--executor {args.executor}")
    started = time.perf_counter()
    with storage.RunLock(out):  # before Prefect or a model starts: a second run on `out` stops at once
        result = run_recipe(recipe, workers=args.workers, out=out, lock=False, executor=args.executor,
                            ray_address=args.ray_address)
    wall = time.perf_counter() - started
    print_result(recipe.name, result, wall)
    return 0


def _needs_chat_model(step_name: str) -> bool:
    from flows.steps import step_class

    return bool(getattr(step_class(step_name), "needs_engine", False))


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
        requested = result.get("rows_requested")
        of = f" of {requested} ({result['rows_kept'] / requested:.0%})" if requested else ""
        print(f"  rows: {result['rows_kept']} kept{of}; dropped: {drops}")
        hint = truncation_hint(result)
        if hint:
            print(f"  {hint}")
    if result.get("generated_tokens"):
        print(f"  generation: {result['generated_tokens']} tokens in {result.get('generation_seconds', 0):.1f}s "
              f"= {result.get('tokens_per_second', 0):.1f} tokens/s")


def truncation_hint(result: dict) -> str | None:
    """When most drops are generations cut at max_tokens: which setting to raise (issue 15)."""
    dropped = result.get("dropped") or {}
    cut = {reason: n for reason, n in dropped.items() if "truncated" in reason}
    total = sum(dropped.values())
    if not cut or sum(cut.values()) * 2 <= total:
        return None
    reason = max(cut, key=cut.get)
    step = next((s["step"] for s in result.get("steps") or [] if reason in (s.get("dropped") or {})), None)
    fields: tuple[str, ...] = ()
    if step:
        from flows.steps import STEPS, step_class

        fields = tuple(step_class(step).Config.model_fields) if step in STEPS else ()
    where = f"steps.{step}." if step else ""
    line = (f"most drops are truncations ({sum(cut.values())} of {total} drops; {reason} {cut[reason]}"
            + (f" in {step}" if step else "") + "): generations hit max_tokens")
    if "repetition_penalty" in fields and reason != "truncated":  # answers: a looping model, not a short cap
        now = _published_config(result, step).get("repetition_penalty")
        if isinstance(now, (int, float)) and now >= 1.15:  # measured: 1.2 truncates more than 1.05 (README)
            return (f"{line}. Fix: lower {where}repetition_penalty (now {now:g}; a strong penalty makes small models "
                    f"ramble: --set {where}repetition_penalty=1.1) or raise {where}max_tokens")
        known = isinstance(now, (int, float))
        if known and now >= 1.1:  # measured: stronger penalties ramble and truncate again (README)
            return (f"{line}. The repetition penalty is already {now:g}: raise {where}max_tokens if the answers are "
                    f"long; answers that loop need a larger model (on the embedded model neither max_tokens=1024 nor "
                    f"frequency / presence / n-gram penalties kept more: README 'Model profiles')")
        to = 1.1  # stops most loops of the embedded model (README 'Model profiles')
        return (f"{line}, usually a small model looping under greedy decoding. Fix: raise {where}repetition_penalty"
                + (f" from {now:g}" if known else "") + f" (--set {where}repetition_penalty={to:g}; README "
                f"'Model profiles') or raise {where}max_tokens")
    return f"{line}. Fix: raise {where}max_tokens (--set {where}max_tokens=...)" if "max_tokens" in fields else line


def _published_config(result: dict, step: str | None) -> dict:
    """The config a step ran with, from the published manifest's lineage ({} when unreadable)."""
    import json
    from pathlib import Path

    try:
        manifest = json.loads((Path(result["dataset"]) / "_manifest.json").read_text())
        return next(e.get("config") or {} for e in manifest.get("lineage") or [] if e.get("name") == step)
    except (KeyError, OSError, ValueError, StopIteration, TypeError, AttributeError):
        return {}


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


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML page about a run folder (reporting.html); matplotlib imported lazily."""
    from reporting import load_run
    from reporting.html import render_report
    from reporting.plots import require_matplotlib

    require_matplotlib()  # before reading anything: the one missing-extra error, with the install command
    if not Path(args.run_dir).expanduser().exists():
        raise UsageError(f"report: {args.run_dir} does not exist. Fix: pass the --out folder of `alignforge run`")
    out = Path(args.out or Path(args.run_dir) / "report.html").expanduser()
    page = render_report(load_run(args.run_dir))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"report: can't write {out} ({exc.strerror or exc}). Fix: pick a writable --out") from None
    print(f"report: {out} ({len(page) // 1024} KiB; open it in a browser, it needs no network)")
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from engines.embedded import prepare_embedded_model

    path = prepare_embedded_model(force=args.force)
    print(f"embedded model ready: {path}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from flows.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        try:
            recipe = load_recipe(str(path))
        except AlignforgeError as exc:  # one broken recipe must not hide the others
            print(f"{name}: (can't load: {exc})")
            continue
        print(f"{name}: {recipe.description}")
        print(f"  file: {path}")
        print(f"  steps: {' -> '.join(s.name + ('' if s.enabled else ' (off)') for s in recipe.steps)}")
        print(f"  publish: {recipe.publish.format}")
        for key, target in recipe.params.items():
            shown = ", ".join(target) if isinstance(target, list) else target
            print(f"  --set {key}=...  -> {shown}")
    print("\nany step field: --set steps.<step>.<field>=... (alignforge steps lists every field)")
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    from flows.steps import STEPS, step_class

    names = [args.name] if getattr(args, "name", None) else list(STEPS)
    for name in names:
        if name not in STEPS:
            raise UsageError(f"unknown step {name!r}; valid steps: {', '.join(STEPS)}")
        try:
            cls = step_class(name)
        except ImportError as exc:
            print(f"{name}: (can't import: {exc})")
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        kind = "source" if cls.source else ("global" if hasattr(cls, "select") else "map")
        print(f"{name}  [{kind}{', engine' if cls.needs_engine else ''}]  {doc[0] if doc else ''}")
        for key, type_name, default, description in _flat_fields(cls.Config):
            print(f"  {key}: {type_name} = {default!r}" + (f"  {description}" if description else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`flow.serve` of flows/deploy.py:recipe_flow on this box: one deployment, runs on a schedule
    (needs a running `prefect server start`; the temporary server has no scheduler). Blocks."""
    from flows.recipe import load_recipe, parse_sets

    sets = dict(parse_sets(args.set or []))
    recipe_ref = args.recipe_name
    if Path(recipe_ref).expanduser().is_file():  # scheduled runs start in their own processes
        recipe_ref = str(Path(recipe_ref).expanduser().resolve())
    loaded = load_recipe(recipe_ref, sets=sets, out=args.out)  # every mistake is one line, before serving
    import storage

    out = storage.check_run_folder(loaded.out if loaded.out is not None else f"runs/{loaded.name}")
    storage.check_publish_target(f"{out}/publish")
    check_writable(out)
    if "://" not in out:
        out = str(Path(out).resolve())  # runs start in subprocesses: name the folder absolutely
    from flows.executors import check_prefect_server, require_ray

    if args.executor == "ray":
        require_ray()
    # Our PREFECT_HOME hides the user's Prefect profile: default to `prefect server start`'s address.
    api = check_prefect_server(os.environ.setdefault("PREFECT_API_URL", DEFAULT_API),
                               "serve (the temporary server has no scheduler)")

    # A scheduler runs unattended: its runs log at INFO (console and the server's UI), not `run`'s quiet levels.
    for key in ("PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL",
                "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"):
        os.environ[key] = "DEBUG" if args.verbose else "INFO"
    from flows.deploy import recipe_flow

    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # Ctrl-C: Prefect's own graceful stop (pauses the
        signal.signal(signal.SIGINT, signal.default_int_handler)  # schedule); it installs its SIGTERM handler too
    name = args.name or loaded.name
    every = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g}s"
    print(f"serving {recipe_flow.name}/{name} ({every}) against {api}; run folder {out}. Ctrl-C stops.", flush=True)
    recipe_flow.serve(name=name, cron=args.cron, interval=args.interval,
                      parameters={"recipe": recipe_ref, "params": sets, "out": out, "workers": args.workers,
                                  "executor": args.executor, "ray_address": args.ray_address},
                      tags=["alignforge", loaded.name], description=loaded.description,
                      limit=1,  # runs of one recipe share a run folder: one at a time, later ones wait
                      print_starting_message=bool(args.verbose))
    return 0


def _field_type(model: type, name: str) -> str:
    ann = model.model_fields[name].annotation
    return getattr(ann, "__name__", None) if isinstance(ann, type) else str(ann).replace("typing.", "")


def _flat_fields(model: type, prefix: str = "") -> list[tuple[str, str, Any, str | None]]:
    """(dotted key, type, default, description) for every leaf field; nested sections flattened."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _flat_fields(ann, f"{prefix}{name}.")
        else:
            default = field.default_factory() if field.default_factory is not None else field.default
            rows.append((prefix + name, _field_type(model, name), "required" if default is PydanticUndefined
                         else default, field.description))
    return rows


def build_parser() -> argparse.ArgumentParser:
    from flows.recipe import builtin_recipes

    RECIPES = list(builtin_recipes())
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
    run.add_argument("recipe_name", metavar="RECIPE",
                     help=f"a recipe file (my_recipe.yaml) or a built-in recipe: {', '.join(sorted(RECIPES))}")
    run.add_argument("--recipe", metavar="FILE.yaml", help="overrides file (keys as for --set, nested)")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="threads for CPU steps' shards (default: CPU cores); output is the same for any N")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override one setting (YAML scalar): n=50, steps.minhash.threshold=0.7, deita.budget=6000")
    _executor_arguments(run)
    run.add_argument("--out", metavar="DIR", help="run folder (the dataset is published to DIR/publish)")
    run.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="summarise a dataset folder (rows, columns, drops, lineage)")
    inspect.add_argument("path", metavar="DIR")
    inspect.set_defaults(func=cmd_inspect)

    report = sub.add_parser("report", help="one self-contained HTML page about a run: steps, drops, plots, rows")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `alignforge run`")
    report.add_argument("--out", metavar="FILE.html", help="where to write the page (default RUN_DIR/report.html)")
    report.set_defaults(func=cmd_report)

    model = sub.add_parser("model", help="manage the embedded model")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    prepare = model_sub.add_parser("prepare", help="convert the embedded GGUF to a safetensors folder (once)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if it exists")
    prepare.set_defaults(func=cmd_model_prepare)

    recipes = sub.add_parser("recipes", help="list built-in recipe files, their steps and --set short names")
    recipes.set_defaults(func=cmd_recipes)

    steps = sub.add_parser("steps", help="list every step with its config fields, types, defaults and help")
    steps.add_argument("name", nargs="?", help="one step only")
    steps.set_defaults(func=cmd_steps)

    serve = sub.add_parser("serve", help="serve a recipe on a schedule on this box (flow.serve; needs `prefect server start`)",
                           description="Serve a recipe as a Prefect deployment with a schedule; scheduled runs execute "
                           "in subprocesses of this command. Needs a running Prefect server (PREFECT_API_URL, default "
                           "http://127.0.0.1:4200/api).")
    serve.add_argument("recipe_name", metavar="RECIPE", help="a recipe file or a built-in recipe")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, as for `run`")
    serve.add_argument("--out", metavar="DIR", help="run folder (the dataset is published to DIR/publish)")
    serve.add_argument("--workers", type=int, default=None, metavar="N", help="threads for CPU steps' shards")
    serve.add_argument("--name", help="deployment name (default: the recipe's name)")
    _executor_arguments(serve)
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='cron schedule, e.g. "0 2 * * *"')
    when.add_argument("--interval", type=float, metavar="S", help="seconds between runs")
    serve.set_defaults(func=cmd_serve)
    return parser


def _executor_arguments(parser: argparse.ArgumentParser) -> None:
    from flows.executors import EXECUTORS

    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: --workers threads + one engine in this process; process: --workers processes; "
                        "ray: shards as Ray tasks, engines as a Ray Data actor pool (ray extra). process and ray "
                        "need a running Prefect server (PREFECT_API_URL)")
    parser.add_argument("--ray-address", default="auto", metavar="ADDR",
                        help="with --executor ray: auto (RAY_ADDRESS or the `ray start` cluster of this machine), "
                        "ray://HEAD:10001, HOST:PORT, or local (a temporary cluster with --workers CPUs)")


INTERRUPTED = "alignforge: interrupted; rerun the same command to resume"


def _stop_children(grace: float = 0.5) -> None:
    """Kill every process this run started (vLLM engine core, Prefect's server, worker pools)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with vLLM and the dev extra
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=grace + 2.0)


def _on_signal(signum, frame) -> None:  # pragma: no cover - exercised by the real-process test
    """SIGINT / SIGTERM: stop what we started, say how to resume, exit 130 now.

    Exiting without unwinding is safe: every shard and manifest is written to a temp name and
    renamed (a rerun resumes from committed shards), and the run-folder lock dies with us. Waiting
    instead lets Prefect retry its dead server for ~80 s and vLLM print its tracebacks."""
    import signal as _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
    _stop_children()
    sys.stdout.flush()
    # On a line of its own: a progress bar may be mid-line on stderr when the signal lands.
    print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
    os._exit(130)


def install_interrupt_handlers() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        import flows.runner

        flows.runner.SIGNAL_HANDLER = _on_signal


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
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130
    except AlignforgeError as exc:
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


def console_main() -> int:
    """The `alignforge` command: main() with SIGINT / SIGTERM handled as a clean, resumable stop."""
    install_interrupt_handlers()
    return main()


if __name__ == "__main__":
    raise SystemExit(console_main())
