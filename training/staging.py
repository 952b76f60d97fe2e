"""Packages are written into a hidden folder beside their destination and moved there once
complete, so that a run stopped part-way (Ctrl-C, an error) leaves no half-written package:
the destination is as it was before the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sota_serve.constants import CARD_FILE
from sota_serve.errors import SotaServeError


class DestinationError(SotaServeError, ValueError):
    """The package's destination is not a folder it can be written to."""


def check_destination(out: str | Path) -> Path:
    """``out`` as a Path, refused before any work when it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DestinationError(f"{out}: exists and is not a folder; choose another --out")
    return out


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside ``out`` to write the package into; when the block ends
    without an exception its files go to ``out``, and in every case the folder is removed."""
    out = check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # beside ``out``, on the same file system, so that moving the files is a rename
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """A new (or empty) ``out`` is the staging folder renamed, in one step. An existing one
    keeps files the package does not write; the package's own are replaced one by one,
    card.json last, so that its card never names files that are not there yet."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        staging.rename(out)
        return
    for path in sorted(staging.iterdir(), key=lambda p: p.name == CARD_FILE):
        target = out / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)
