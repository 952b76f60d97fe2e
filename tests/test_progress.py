"""Long jobs say what they are doing: one line on stderr per step, terminal or not."""

from __future__ import annotations

import shutil

import numpy as np

from sota_serve.building.export import export_package
from sota_serve.cli import main as cli
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from tests.helpers import card_dict, tiny_cnn


def test_export_says_each_file_the_calibration_and_the_parity_check(photos, tmp_path, capsys):
    card = ModelCard.parse(card_dict())
    pre = Preprocessor.from_card(card)
    crops = np.concatenate([pre(p.read_bytes()) for p in photos])
    export_package(tiny_cnn(), card, tmp_path / "pkg", check_inputs=crops, int8=True, calibration=crops, fp16=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:6] == ["export onnx fp32 ...", "export onnx fp16 ...", "export pt2 fp32 ...", "export pt2 fp16 ...",
                         "export torchscript fp32 ...", "export torchscript fp16 ..."]
    assert lines[6] == f"int8 calibration: onnx on {len(crops)} images ..."
    assert lines[7].startswith("export parity: onnx, onnx-fp16, pt2, pt2-fp16, torchscript, torchscript-fp16,"
                               " onnx-int8 against")
    assert len(lines) == 8, lines  # nothing else: no deprecation notice from the project's own export


def test_quantize_says_the_calibration_and_the_agreement(tiny_package, digit_files, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    folder = tmp_path / "images"
    folder.mkdir()
    for f in digit_files[:40]:
        shutil.copy(f, folder / f.name)
    assert cli(["quantize", str(pkg), "--calibration", str(folder)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["int8 calibration: onnx on 20 images ...",
                   "int8 agreement with fp32 on 20 held-out calibration images (cpu) ..."]


def test_a_pacer_says_at_most_once_per_interval_and_nothing_off_a_terminal(capsys):
    import time

    from sota_serve.progress import Pacer

    off = Pacer(0.0, enabled=False)
    assert not any(off.due() for _ in range(5))
    assert not Pacer(0.0).enabled  # stderr is captured here: not a terminal
    on = Pacer(0.2, enabled=True)
    assert not on.due()  # the first line comes one interval in, not at once
    time.sleep(0.25)
    assert on.due() and not on.due()  # then once per interval
    assert on.elapsed >= 0.25
    on.restart()
    assert on.elapsed < 0.2 and not on.due()
    on.say("epoch 1 (stage 1, 48px): batch 3/23, loss 1.2345, 10s")
    assert capsys.readouterr().err == "epoch 1 (stage 1, 48px): batch 3/23, loss 1.2345, 10s\n"
