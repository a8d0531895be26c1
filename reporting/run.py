"""A run folder read back: which steps ran in which order, what each kept and dropped, and the rows.

Which stage folders belong to the run: the published `_manifest.json` lineage names them
(`stages/<name>-<fingerprint[:12]>`), in order. Without a publish (a run that stopped early) the
chain is walked back from the newest committed stage through its input fingerprints; score-only
stages of global steps (`minhash_score`, ...) are left out of the table as the card leaves them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from alignforge.errors import AlignforgeError

# Score columns are the filters' flat typed columns (DESIGN: named after their filter).
SCORE_PREFIXES = ("deita_", "reward", "zipfit_", "minhash_cluster_size", "semdedup_", "heur_", "diversity_",
                  "score_")
# Numeric, but ids, ranks or counters rather than scores.
NOT_SCORES = ("minhash_cluster", "zipfit_rank", "deita_rank", "semdedup_duplicate_of", "deita_missing_tokens",
              "candidate_index")
LENGTH_COLUMNS = ("instruction_chars", "response_chars")
HEAVY = ("minhash_signature", "minhash_shingles", "semdedup_embedding", "deita_embedding")  # flows.runner.HEAVY_COLUMNS


class RunFolderError(AlignforgeError):
    """The folder is no alignforge run folder (no committed stage under stages/)."""


@dataclass
class StageView:
    """One committed stage of the run: its label in the run, manifest and folder."""

    label: str
    manifest: dict[str, Any]
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.get("step_name") or self.label

    def read(self, rejected: bool = False) -> pl.DataFrame:
        from storage import ShardedDataset

        df = ShardedDataset(str(self.path)).read(rejected=rejected)
        return df.drop([c for c in HEAVY if c in df.columns])


@dataclass
class RunView:
    """What `load_run` returns: the run's stages in order and its publish manifest (None if unpublished)."""

    path: Path
    stages: list[StageView]
    publish: dict[str, Any] | None = None
    _rows: pl.DataFrame | None = field(default=None, repr=False)

    # ------------------------------------------------------------ tables

    def steps_table(self) -> pl.DataFrame:
        """One row per step (and a `publish` row for drops made while publishing, e.g. tied pairs)."""
        rows = []
        for stage in self.stages:
            m = stage.manifest
            counts = m.get("rows") or {}
            summary = m.get("summary") or m.get("stats") or {}
            dropped = dict(counts.get("dropped_by_reason") or summary.get("dropped") or {})
            rows_in = int(counts.get("in", summary.get("rows_in", 0)) or 0)
            kept = int(counts.get("kept", summary.get("rows_out", 0)) or 0)
            rows.append({"step": stage.label, "version": m.get("step_version"),
                         "fingerprint": str(m.get("fingerprint") or "")[:12], "rows_in": rows_in, "kept": kept,
                         "dropped": sum(dropped.values()), "dropped_by_reason": _reasons_text(dropped),
                         "kept_share": round(kept / rows_in, 4) if rows_in else None,
                         "seconds": float(summary.get("seconds") or (m.get("timings") or {}).get("seconds") or 0.0),
                         "tokens": int(summary.get("generated_tokens") or 0)})
        extra = self.publish_drops()
        if self.publish is not None and self.stages:
            kept = sum(int(s.get("num_examples", 0)) for s in ((self.publish.get("configs") or {}).get("default")
                                                                or {}).values())
            rows.append({"step": "publish", "version": None, "fingerprint": "", "rows_in": rows[-1]["kept"],
                         "kept": kept, "dropped": sum(extra.values()), "dropped_by_reason": _reasons_text(extra),
                         "kept_share": round(kept / rows[-1]["kept"], 4) if rows[-1]["kept"] else None,
                         "seconds": 0.0, "tokens": 0})
        schema = {"step": pl.Utf8, "version": pl.Int64, "fingerprint": pl.Utf8, "rows_in": pl.Int64,
                  "kept": pl.Int64, "dropped": pl.Int64, "dropped_by_reason": pl.Utf8, "kept_share": pl.Float64,
                  "seconds": pl.Float64, "tokens": pl.Int64}
        return pl.DataFrame(rows, schema=schema)

    def publish_drops(self) -> dict[str, int]:
        """Drops the publish made itself (pair building: `pair:*`, unscored `candidate:*`)."""
        if not self.publish:
            return {}
        during = {}
        for stage in self.stages:
            for reason, n in ((stage.manifest.get("rows") or {}).get("dropped_by_reason") or {}).items():
                during[reason] = during.get(reason, 0) + int(n)
        out = {}
        for reason, n in (self.publish.get("dropped_by_reason") or {}).items():
            extra = int(n) - during.get(reason, 0)
            if extra > 0:
                out[reason] = extra
        return out

    def drop_reasons(self) -> pl.DataFrame:
        """(step, reason, rows), largest first within each step, steps in run order."""
        table = self.steps_table()
        rows = []
        for stage in self.stages:
            reasons = (stage.manifest.get("rows") or {}).get("dropped_by_reason") or {}
            rows += [{"step": stage.label, "reason": r, "rows": int(n)}
                     for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        if "publish" in table["step"].to_list():
            rows += [{"step": "publish", "reason": r, "rows": n}
                     for r, n in sorted(self.publish_drops().items(), key=lambda kv: -kv[1])]
        return pl.DataFrame(rows, schema={"step": pl.Utf8, "reason": pl.Utf8, "rows": pl.Int64})

    # ------------------------------------------------------------ rows

    def rows(self) -> pl.DataFrame:
        """Kept rows of the last step (`status` "kept") and every step's dropped rows (`status`
        "dropped", `dropped_at` = the step, `drop_reason`), with `instruction_chars` / `response_chars`."""
        if self._rows is None:
            parts = []
            if self.stages:
                kept = self.stages[-1].read()
                parts.append(kept.drop([c for c in ("keep", "drop_reason") if c in kept.columns])
                             .with_columns(status=pl.lit("kept"), dropped_at=pl.lit(None, dtype=pl.Utf8)))
            for stage in self.stages:
                dropped = stage.read(rejected=True)
                if dropped.height:
                    parts.append(dropped.drop([c for c in ("keep",) if c in dropped.columns])
                                 .with_columns(status=pl.lit("dropped"), dropped_at=pl.lit(stage.label)))
            parts = [p for p in parts if p.width]
            rows = pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()
            if "drop_reason" not in rows.columns and rows.width:
                rows = rows.with_columns(drop_reason=pl.lit(None, dtype=pl.Utf8))
            self._rows = with_lengths(rows)
        return self._rows

    def kept(self) -> pl.DataFrame:
        rows = self.rows()
        return rows.filter(pl.col("status") == "kept") if rows.width else rows

    def dropped(self) -> pl.DataFrame:
        rows = self.rows()
        return rows.filter(pl.col("status") == "dropped") if rows.width else rows

    def examples(self, n: int = 5) -> dict[str, pl.DataFrame]:
        """`n` kept rows and `n` dropped rows per drop reason: {"kept": df, "<reason>": df, ...}."""
        out = {"kept": self.kept().head(n)}
        dropped = self.dropped()
        if dropped.height:
            for reason in dropped["drop_reason"].fill_null("(none)").value_counts(sort=True)["drop_reason"]:
                out[reason] = dropped.filter(pl.col("drop_reason").fill_null("(none)") == reason).head(n)
        return out

    def all_stage_rows(self, *, columns: list[str] | None = None) -> pl.DataFrame:
        """Kept and dropped rows of EVERY step (with `stage`), for parent -> child joins (rewrite gains)."""
        parts = []
        for stage in self.stages:
            for rejected in (False, True):
                df = stage.read(rejected=rejected)
                if columns is not None:
                    df = df.select([c for c in columns if c in df.columns])
                if df.height:
                    parts.append(df.with_columns(stage=pl.lit(stage.label)))
        return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()


def _reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])) or "-"


def score_columns(df: pl.DataFrame) -> list[str]:
    """The numeric score columns present (filters' columns: deita_*, reward, zipfit_*, heur_* ...)."""
    out = []
    for name, dtype in df.schema.items():
        if name in NOT_SCORES or name.endswith(("_rank", "_error")) or not dtype.is_numeric():
            continue
        if name.startswith(SCORE_PREFIXES):
            out.append(name)
    return out


def with_lengths(df: pl.DataFrame) -> pl.DataFrame:
    """Adds `instruction_chars` and `response_chars` (null when the layout has no such text)."""
    if not df.width:
        return df
    from filters.text import instruction_expr, response_expr

    try:
        instruction = instruction_expr(df).str.len_chars()
    except Exception:  # noqa: BLE001 - a layout without text (e.g. seeds): no length
        instruction = pl.lit(None, dtype=pl.UInt32)
    response = response_expr(df) if df.width else None
    return df.with_columns(instruction_chars=instruction.cast(pl.Int64),
                           response_chars=(response.str.len_chars() if response is not None
                                           else pl.lit(None)).cast(pl.Int64))


def load_run(path: str | Path) -> RunView:
    """The run folder at `path` (a folder holding `stages/`, or its `publish/` folder)."""
    root = Path(path).expanduser()
    if root.name == "publish" and not (root / "stages").is_dir():
        root = root.parent
    stages_dir = root / "stages"
    if not stages_dir.is_dir():
        raise RunFolderError(f"{path}: no stages/ folder, so no alignforge run folder. Fix: pass the --out folder "
                             "of `alignforge run` (it holds stages/ and publish/)")
    manifests = {}
    for folder in sorted(stages_dir.iterdir()):
        m = _read_json(folder / "_manifest.json")
        if isinstance(m, dict) and m.get("fingerprint"):
            manifests[folder.name] = (folder, m)
    if not manifests:
        raise RunFolderError(f"{path}: no committed stage under stages/ (a run killed before its first step "
                             "finished). Fix: rerun the same command to finish it")
    publish = _read_json(root / "publish" / "_manifest.json")
    publish = publish if isinstance(publish, dict) and str(publish.get("stage", "")).startswith("publish@") else None
    stages = []
    lineage = (publish or {}).get("lineage") or []
    if lineage:
        for entry in lineage:
            name = entry.get("name") or str(entry.get("stage", "")).split("@")[0]
            hit = manifests.get(f"{name}-{str(entry.get('fingerprint') or '')[:12]}")
            if hit:
                stages.append(StageView(label=name, manifest=hit[1], path=hit[0]))
    if not stages:
        stages = _chain(manifests)
    return RunView(path=root, stages=stages, publish=publish)


def _chain(manifests: dict[str, tuple[Path, dict]]) -> list[StageView]:
    by_fp = {m["fingerprint"]: (folder, m) for folder, m in manifests.values()}
    newest = max(manifests.values(), key=lambda fm: str(fm[1].get("created_at") or ""))
    chain, seen, current = [], set(), newest
    while current and current[1]["fingerprint"] not in seen:
        seen.add(current[1]["fingerprint"])
        chain.append(current)
        inputs = current[1].get("input_fingerprints") or []
        current = by_fp.get(inputs[0]) if inputs else None
    chain.reverse()
    return [StageView(label=m.get("step_name") or folder.name.rsplit("-", 1)[0], manifest=m, path=folder)
            for folder, m in chain if not str(m.get("step_name") or folder.name).endswith("_score")]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
