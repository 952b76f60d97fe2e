"""The benchmark is a developer tool: the wheel does not ship it (no top-level ``bench`` module
in a user's site-packages), ``sota-serve bench`` runs it from a clone, and an install without
the ``bench`` extra is told so at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


@pytest.mark.timeout(300)
def test_the_wheel_has_no_top_level_bench(tmp_path):
    # A copy of what a build reads, so that no earlier build's build/lib of the checkout can
    # leak into this wheel; bench/ is copied too, to show the wheel leaves it out.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("sota_serve", "training", "bento", "rayserve", "bench"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "results", ".cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sota_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"sota_serve", "training", "bento", "rayserve"}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "bench" not in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sota_serve/http/page/index.html" in names and "sota_serve/py.typed" in names


def test_bench_without_its_extra_says_which_to_install_at_once():
    # sys.modules[name] = None is how Python marks a module as absent: importing it fails.
    code = ("import sys; sys.modules['litserve'] = None; from sota_serve.cli import main;"
            " sys.exit(main(['bench', '--quick']))")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    elapsed = time.monotonic() - start
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "litserve" in lines[0] and "pip install 'sota-serve[bench]'" in lines[0]
    assert elapsed < 20, f"took {elapsed:.0f} s"  # nothing was built or started first


def test_bench_runs_the_clones_benchmark_with_its_own_options():
    out = subprocess.run([sys.executable, "-m", "sota_serve.cli", "bench", "--help"], env=_env(),
                         cwd=Path.home(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: sota-serve bench") and "--litserve-workers" in out.stdout
    helped = subprocess.run([sys.executable, "-m", "sota_serve.cli", "--help"], env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert "bench" in helped.stdout and "clone of the repository" in helped.stdout
