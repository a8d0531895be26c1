"""The one publish helper: drops, rejected rows and the dataset card of any recipe run.

The default config's layout comes from `publish.format` (schemas owns what each layout is);
`publish.configs` adds named configs from any step's kept rows. Rule for "nothing survived":
the empty default config, `rejected/` and the card are still published (so `publish/` never
shows an older run's data as current), then `NothingSurvived` (exit 2, one line) says why.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from alignforge.errors import AlignforgeError

_INTERNAL = ("keep", "drop_reason")


class NothingSurvived(AlignforgeError):
    """Every row was dropped: the empty dataset, rejected/ and the card are published anyway."""


def _heavy() -> tuple[str, ...]:
    from flows.runner import HEAVY_COLUMNS

    return HEAVY_COLUMNS


def _project(df: pl.DataFrame, columns: list[str] | None) -> pl.DataFrame:
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing and df.height:
            from flows.recipe import RecipeError

            raise RecipeError(f"publish: column {missing[0]!r} is not in the final rows (columns: {df.columns}). "
                              "Fix: set publish.columns to columns the last step produces")
        return df.select([c for c in columns if c in df.columns])
    return df.drop([c for c in (*_heavy(), *_INTERNAL) if c in df.columns])


def build_configs(recipe: Any, stages: list[tuple[str, Any]]) -> tuple[dict[str, pl.DataFrame], list[pl.DataFrame],
                                                                         dict[str, int]]:
    """(configs, extra rejected frames, extra drop counts) for the recipe's publish section."""
    spec = recipe.publish
    final = stages[-1][1].read()
    configs: dict[str, pl.DataFrame] = {}
    rejected: list[pl.DataFrame] = []
    drops: dict[str, int] = {}
    if spec.format == "preference":
        from schemas.preference import build_preferences

        built = build_preferences(final, margin=spec.margin)
        cols = spec.columns or ["id", "parent_id", "origin", "prompt", "chosen", "rejected", "score_chosen",
                                "score_rejected"]
        configs["default"] = built.preferences.select([c for c in cols if c in built.preferences.columns])
        configs["candidates"] = built.candidates
        if built.rejected.height:
            rejected.append(built.rejected)
            for reason, count in built.rejected["drop_reason"].value_counts().iter_rows():
                drops[f"pair:{reason}"] = int(count)
        for reason, count in (getattr(built, "unscored", None) or {}).items():
            drops[f"candidate:{reason}"] = int(count)  # unscored candidates: listed with null score + reason
    else:
        for column, value in (spec.where or {}).items():
            final = final.filter(pl.col(column) == value)
        configs["default"] = _project(final.sort("id") if "id" in final.columns else final, spec.columns)
    by_name = dict(stages)
    for name, extra in spec.configs.items():
        if extra.step not in by_name:
            from flows.recipe import RecipeError

            raise RecipeError(f"publish.configs.{name}: no step {extra.step!r} ran in this recipe "
                              f"(steps: {', '.join(by_name)})")
        rows = by_name[extra.step].read()
        for column, value in (extra.where or {}).items():
            rows = rows.filter(pl.col(column) == value)
        if rows.height:  # an extra config with no rows (e.g. verbose answers switched off) is not published
            configs[name] = _project(rows.sort("id") if "id" in rows.columns else rows, extra.columns)
    return configs, rejected, drops


def card_plots(run_url: str) -> list[str]:
    """Plot PNGs under publish/plots/, linked from the card (reporting.card); a plotting failure never
    fails a published run: one line on stderr instead."""
    try:
        from reporting.card import add_card_plots

        return add_card_plots(run_url)
    except Exception as exc:  # noqa: BLE001 - observability only; the dataset is already published
        import sys

        print(f"alignforge: card plots skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []


def _card_sections(stages: list[tuple[str, Any]]) -> dict[str, str]:
    """Sections steps add to the card (e.g. diversity's NC vs i.i.d. table) from every row of the run."""
    from flows.steps import STEPS, step_class

    sections: dict[str, str] = {}
    for label, ds in stages:
        hook = getattr(step_class(label), "card_section", None) if label in STEPS else None
        if hook is None:
            continue
        kept = ds.read().with_columns(pl.lit(True).alias("keep"))
        dropped = [other.read(rejected=True) for _, other in stages]
        frames = [kept, *[d.with_columns(pl.lit(False).alias("keep")) for d in dropped if d.height]]
        section = hook(pl.concat(frames, how="diagonal_relaxed"))
        if section:
            sections[section[0]] = section[1]
    return sections


def publish_run(recipe: Any, stages: list[tuple[str, Any]], run_url: str, *, model_id: str | None) -> dict:
    """Publish the run to `<run>/publish` with rejected rows and a card listing every step."""
    import storage
    from flows.runner import stage_summary

    configs, extra_rejected, pair_drops = build_configs(recipe, stages)
    steps, drops, tokens, seconds = [], {}, 0, 0.0
    for label, ds in stages:
        manifest = ds.manifest() or {}
        summary = stage_summary(ds)
        for reason, count in summary["dropped"].items():
            drops[reason] = drops.get(reason, 0) + count
        tokens += summary["generated_tokens"]
        if summary["generated_tokens"]:
            seconds += summary["seconds"]
        steps.append({"step": label, "version": manifest.get("step_version"), "fingerprint": manifest.get("fingerprint"),
                      "rows_in": summary["rows_in"], "rows_kept": summary["rows_out"], "dropped": summary["dropped"],
                      "config": manifest.get("config"), "stats": (manifest.get("stats") or {}).get("step", {})})
    drops.update(pair_drops)
    errors = [f"{s['step']}: {v}" for s in steps for k, v in (s["stats"] or {}).items()
              if "error" in k and isinstance(v, str)]
    heavy = _heavy()
    rejected = [ds.read(rejected=True) for _, ds in stages]
    rejected = [r.drop([c for c in heavy if c in r.columns]) for r in [*rejected, *extra_rejected] if r.height]
    rejected_rows = pl.concat(rejected, how="diagonal_relaxed") if rejected else None
    spec = recipe.publish
    from engines.profiles import profile_for, profile_name

    sections = _card_sections(stages)
    applied = {f"{step.name}.{field}": value for step in recipe.enabled_steps()
               for field, value in profile_for(recipe.model).get(step.name, {}).items() if field not in step.config}
    card = {
        "title": spec.title or f"{recipe.name} (alignforge)",
        "recipe": recipe.name,
        "method": spec.method or recipe.description or " -> ".join(label for label, _ in stages),
        "model": model_id,
        "steps": steps,
        **({"sampling": {f"model profile ({profile_name(recipe.model)})": ", ".join(
            f"{k}={v}" for k, v in applied.items())}} if applied else {}),
        "params": recipe.model_dump(mode="json", exclude={"source"}),
        "lineage": {label: ds.manifest() for label, ds in stages},
        "drop_stats": dict(sorted(drops.items())),
        "sections": sections,
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds else 0.0,
    }
    publish_url = f"{run_url}/publish"
    empty = configs["default"].height == 0
    storage.publish(publish_url, configs=configs, rejected=rejected_rows, test_size=spec.test_size, seed=recipe.seed,
                    card=card, **({"allow_empty": True} if empty else {}))
    card_plots(run_url)
    first = stages[0][1]
    requested = stage_summary(first)["rows_out"] if stages else 0
    result = {"dataset": publish_url, "rows_kept": configs["default"].height, "rows_requested": requested,
              "dropped": dict(sorted(drops.items())), "generated_tokens": tokens,
              "generation_seconds": round(seconds, 2),
              "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0,
              "configs": {name: df.height for name, df in configs.items()},
              "steps": [{k: s[k] for k in ("step", "rows_in", "rows_kept", "dropped")} for s in steps]}
    if errors:
        result["errors"] = errors
    if configs["default"].height == 0:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])) or "none"
        raise NothingSurvived(
            f"{recipe.name}: no row survived the run (dropped: {shown}); published an empty dataset with rejected/ "
            f"and the card at {publish_url}. Fix: see the drop reasons (rejected/ holds every dropped row) and "
            "loosen the step that dropped most, or raise n" + (f". Step errors: {'; '.join(errors)}" if errors else ""))
    return result
