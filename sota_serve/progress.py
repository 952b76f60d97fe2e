"""Progress for long jobs (training, its evaluation and export, ``quantize``): one short line
per step on stderr, wherever it goes (a terminal, a log, CI), so minutes of work never pass
in silence; within a step, a progress bar or a line now and then (:class:`Pacer`) only on a
terminal, so logs and CI stay clean."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty()


def step(what: str) -> None:
    """Say on stderr that the step ``what`` starts (one line, e.g. ``export onnx fp32``)."""
    print(f"{what} ...", file=sys.stderr, flush=True)


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=not interactive(), leave=False)


class Pacer:
    """Paces the lines within a long step: :meth:`due` is true at most once every ``every``
    seconds, and never when ``enabled`` is false (by default: when stderr is not a terminal)."""

    def __init__(self, every: float, *, enabled: bool | None = None) -> None:
        self.every = every
        self.enabled = interactive() if enabled is None else enabled
        self.restart()

    def restart(self) -> None:
        self.start = self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def due(self) -> bool:
        if not self.enabled:
            return False
        now = time.perf_counter()
        if now - self._last < self.every:
            return False
        self._last = now
        return True

    def say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
