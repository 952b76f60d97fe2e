"""``sota-serve quantize`` changes nothing it was not asked to: a model-store entry gets a new
version instead of new bytes under its tag, and an existing int8 file is kept unless
``--overwrite``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sota_serve.cli import main as cli
from sota_serve.package.loading import open_package, store_model_dir


@pytest.fixture
def calibration_folder(digit_files, photos, tmp_path) -> Path:
    folder = tmp_path / "calibration"
    folder.mkdir()
    for f in [*digit_files, *photos]:
        shutil.copy(f, folder / f.name)
    return folder


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _sota_serve(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sota_serve.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_store_tag_gets_a_new_version_and_the_stored_one_keeps_its_bytes(tiny_package, calibration_folder,
                                                                           tmp_path, monkeypatch):
    home = tmp_path / "home"
    imported = _sota_serve("import", str(tiny_package), "--name", "tiny-q", home=home)
    assert imported.returncode == 0, imported.stderr
    monkeypatch.setenv("BENTOML_HOME", str(home))
    first = store_model_dir("tiny-q:latest")
    assert first is not None
    before = _bytes(first)

    out = _sota_serve("quantize", "tiny-q:latest", "--calibration", str(calibration_folder), home=home)
    assert out.returncode == 0, out.stderr
    assert f"tiny-q:latest (tiny-q:{first.name}) is left as it is" in out.stdout
    assert "wrote model.int8.onnx" in out.stdout
    tag = re.search(r"imported into the BentoML model store as (\S+)", out.stdout)
    assert tag is not None, out.stdout
    second = store_model_dir(tag.group(1))
    assert second is not None and second != first
    assert _bytes(first) == before  # the old tag's bytes, card included, as they were
    assert store_model_dir("tiny-q:latest") == second
    package = open_package(second)  # verifies every sha256, the new file's included
    assert package.precisions("onnx") == ("fp32", "int8") and "onnx-int8" not in open_package(first).card.artifacts

    # the new version has an int8 file: quantizing it again is refused, and nothing is written
    again = _sota_serve("quantize", "tiny-q:latest", "--calibration", str(calibration_folder), home=home)
    assert again.returncode == 2 and "model.int8.onnx" in again.stderr, again.stderr
    assert "tiny-q:latest: already has" in again.stderr and "pass --overwrite to calibrate" in again.stderr
    assert "overwrite=True" not in again.stderr and "sota-serve-quantize-" not in again.stderr
    assert len([p for p in (home / "models" / "tiny-q").iterdir() if p.is_dir()]) == 2


def test_an_existing_int8_file_is_kept_unless_overwrite(tiny_package, calibration_folder, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    assert cli(["quantize", str(pkg), "--calibration", str(calibration_folder)]) == 0
    capsys.readouterr()
    quantized = _bytes(pkg)

    assert cli(["quantize", str(pkg), "--calibration", str(calibration_folder), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{pkg}: already has model.int8.onnx" in err and "pass --overwrite to calibrate" in err, err
    assert "overwrite=True" not in err  # a keyword of the library, not of the command line
    assert _bytes(pkg) == quantized

    assert cli(["quantize", str(pkg), "--calibration", str(calibration_folder), "--seed", "1", "--overwrite"]) == 0
    assert "wrote model.int8.onnx" in capsys.readouterr().out
    package = open_package(pkg)  # the card records the new file's sha256
    assert package.precisions("onnx") == ("fp32", "int8")
    assert package.card.artifacts["onnx"].sha256 == open_package(tiny_package).card.artifacts["onnx"].sha256


@pytest.mark.parametrize(("make", "says"), [(lambda p: None, "no such folder"),
                                            (lambda p: p.write_bytes(b"x"), "not a folder")])
def test_a_calibration_path_that_is_not_a_folder_is_named_so(tiny_package, tmp_path, capsys, make, says):
    path = tmp_path / "nope"
    make(path)
    assert cli(["quantize", str(tiny_package), "--calibration", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {says}" in err and "no images found" not in err
