"""The one contract every stage and filter follows.

A step is a small object with a frozen pydantic config, a `name`, an integer `version`, and a
call over one polars DataFrame shard. Its fingerprint = hash(name, version, config, input
fingerprints), so a config change recomputes and an unchanged one resumes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict

from schemas import stable_hash


class StepConfig(BaseModel):
    """Frozen, strict config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Step:
    """Base for stages (generate rows) and filters (annotate rows with scores, keep, drop_reason)."""

    name: ClassVar[str] = "step"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StepConfig]] = StepConfig

    def __init__(self, config: StepConfig | None = None, **overrides: Any):
        if config is None:
            config = self.Config(**overrides)
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        # Counters a flow reads for its summary line (tokens, seconds, drops...), reset per call.
        self.stats: dict[str, Any] = {}

    @property
    def origin(self) -> str:
        return f"{self.name}@{self.version}"

    def fingerprint(self, *input_fingerprints: str, engine_id: str | None = None) -> str:
        return stable_hash(self.name, self.version, self.config.model_dump(mode="json"),
                           list(input_fingerprints), engine_id)

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class EngineStep(Step):
    """A step that generates with an engine it is given (stages never load models themselves)."""

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.engine = engine
