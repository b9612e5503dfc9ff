"""The one object every stage of a run receives: config, lake paths, clock and the (lazy) GE validator."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.config import NestcastConfig
from core.lake import LakePaths

if TYPE_CHECKING:
    from core.expectations import GEValidator


class Clock:
    """Seconds per phase for the whole run (``seconds``), optionally also added to a per-file dict."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, *others: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            for target in (self.seconds, *others):
                target[name] = target.get(name, 0.0) + elapsed


class _LazyValidator:
    """GE costs seconds to import and set up; a run that skips every file must not pay for it."""

    def __init__(self) -> None:
        self._validator: GEValidator | None = None

    def get(self, clock: Clock) -> GEValidator:
        if self._validator is None:
            with clock.phase("ge_setup"):
                from core.expectations import GEValidator

                self._validator = GEValidator()
        return self._validator


@dataclass(frozen=True)
class IngestContext:
    """Shared by a run's stages; :meth:`for_file` gives a copy whose phases also land in that file's timings."""

    config: NestcastConfig
    paths: LakePaths
    clock: Clock = field(default_factory=Clock)
    timings: dict[str, float] = field(default_factory=dict)
    _validator: _LazyValidator = field(default_factory=_LazyValidator, repr=False)

    @classmethod
    def of(cls, config: NestcastConfig) -> IngestContext:
        return cls(config=config, paths=LakePaths.of(config))

    @property
    def ge(self) -> GEValidator:
        return self._validator.get(self.clock)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.clock.phase(name, self.timings)

    def for_file(self) -> IngestContext:
        return dataclasses.replace(self, timings={})
