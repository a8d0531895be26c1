"""What the data looks like: column types, stable row ids, validation with clear errors.

Every row carries `id` (stable content hash), `parent_id` (row it was derived from, null for
roots) and `origin` (`stage@version`). Conversations are `messages: list<struct<role, content>>`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
MESSAGES = pl.List(MESSAGE)

# Columns every row has, whatever the stage.
LINEAGE = {"id": pl.Utf8, "parent_id": pl.Utf8, "origin": pl.Utf8}
# Filters add these; storage routes keep == False rows to rejected/ with the reason.
KEEP = {"keep": pl.Boolean, "drop_reason": pl.Utf8}


class SchemaError(ValueError):
    """Bad input: names the dataset, column and row, and says how to fix it."""

    def __init__(self, message: str, *, dataset: str | None = None, column: str | None = None,
                 row: int | str | None = None, fix: str | None = None):
        where = ", ".join(
            f"{k} {v!r}" for k, v in (("dataset", dataset), ("column", column), ("row", row)) if v is not None
        )
        text = f"{message}" + (f" (at {where})" if where else "") + (f". Fix: {fix}" if fix else "")
        super().__init__(text)
        self.dataset, self.column, self.row, self.fix = dataset, column, row, fix


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Deterministic hex digest of JSON-serialisable parts (same input -> same id on any machine)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=length // 2 if length <= 128 else 64).hexdigest()


def row_id(origin: str, *content: Any) -> str:
    """Stable id of a row: hash of the producing stage and the content that defines the row."""
    return stable_hash(origin, *content)
