"""Progress for long jobs (training's evaluation and export, ``quantize``): one short line
per step on stderr, wherever it goes (a terminal, a log, CI), so minutes of work never pass
in silence; a progress bar within a step only on a terminal, so logs and CI stay clean."""

from __future__ import annotations

import sys
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
