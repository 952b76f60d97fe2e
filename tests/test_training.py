"""Real fastai training on small local data (real scikit-learn digits), no downloads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from sota_serve.classifier import Classifier
from sota_serve.cli import main as cli
from sota_serve.constants import IMAGENET_MEAN, IMAGENET_STD
from sota_serve.package.loading import open_package
from tests.conftest import make_image_folder

pytestmark = pytest.mark.slow

TINY_STAGES = "24:1:32:1e-2,32:1:32:5e-3"


def _train(folder: Path, out: Path, *extra: str, stages: str = TINY_STAGES) -> dict:
    assert cli(["train", "--data", str(folder), "--arch", "xresnet18", "--stages", stages,
                "--mixup", "0.2", "--label-smoothing", "0.1", "--name", "tiny-digits", "--out", str(out),
                *extra]) == 0
    return json.loads((out / "card.json").read_text())


@pytest.fixture(scope="module")
def trained(small_digits_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "pkg"
    _train(small_digits_folder, out, "--normalization", "imagenet", "--fp16")
    return out


def test_train_writes_a_complete_package_with_imagenet_stats(trained):
    card = json.loads((trained / "card.json").read_text())
    assert card["labels"] == ["0", "1", "7"]
    assert tuple(card["normalization"]["mean"]) == IMAGENET_MEAN
    assert tuple(card["normalization"]["std"]) == IMAGENET_STD
    recipe = card["training"]["recipe"]
    assert recipe["mixup"] == 0.2 and recipe["label_smoothing"] == 0.1
    assert [s["size"] for s in recipe["stages"]] == [24, 32]
    history = card["training"]["history"]
    assert [h["stage"] for h in history] == [1, 2, 2]  # fit_one_cycle(1), then fine_tune(1) = 1 frozen + 1
    assert all(h["seconds"] > 0 and 0 <= h["accuracy"] <= 1 for h in history)
    metrics = card["metrics"]
    for key in ("accuracy", "accuracy_flip", "accuracy_five_crop", "accuracy_ten_crop",
                "accuracy_fastai_tta", "valid_loss"):
        assert 0 <= metrics[key] <= max(1, metrics[key])
    tta = metrics["tta"]
    assert list(tta["policies"]) == ["none", "flip", "five_crop", "ten_crop"]
    assert tta["tune_images"] == 18 and tta["held_out_images"] == 18
    assert [p["model_calls_per_image"] for p in tta["policies"].values()] == [1, 2, 5, 10]
    assert tta["default"] == card["tta"]["default"] in tta["policies"]
    assert card["tta"]["ten_crop"]["resize_shortest_edge"] in (37, 40)
    assert card["tta"]["flip"]["resize_shortest_edge"] == card["preprocess"]["resize_shortest_edge"]
    ood = card["ood"]
    assert list(ood["policies"]) == ["none", "flip", "five_crop", "ten_crop"]
    assert ood["fit_images"] == 108 and ood["calibration_images"] == 36
    assert all(f["valid_flag_rate"] <= 0.03 for f in ood["policies"].values())
    assert metrics["accuracy"] == metrics["accuracy_fastai_pipeline"]
    assert metrics["valid_count"] == 36 and metrics["train_count"] == 108
    assert card["parity"]["top1_agreement"] >= 0.99 and card["parity"]["max_abs_diff"] < 1e-3
    assert card["input"]["height"] == 32 and card["tta"]["five_crop"]["resize_shortest_edge"] in (37, 40)
    assert card["training"]["dataset"]["fingerprint"]
    package = open_package(trained)
    assert package.verified and set(package.backends) == {"onnx", "pt2", "torchscript"}
    readme = (trained / "README.md").read_text()
    assert "ten-crop TTA" in readme and "Training history" in readme and "parity" in readme
    for png in ("training_curve.png", "confusion_matrix.png"):
        assert Image.open(trained / png).size[0] > 100


def test_fp16_files_are_measured_on_the_validation_set(trained, digit_files):
    card = open_package(trained).card
    assert set(card.artifacts) == {"onnx", "onnx-fp16", "onnx-int8", "pt2", "pt2-fp16", "torchscript",
                                  "torchscript-fp16"}
    half = card.fp16
    assert half.source == "validation" and half.images == card.metrics.valid_count == 36
    assert half.device == card.training.device
    assert set(half.top1_agreement) == {"onnx", "pt2", "torchscript"}
    assert all(a >= 0.97 for a in half.top1_agreement.values()), half  # 36 images: one flip is 2.8 %
    assert all(d < 0.05 for d in half.max_abs_diff.values()), half
    images = [f.read_bytes() for f in digit_files[:24]]
    full = Classifier.open(trained, device="cpu").probabilities(images)
    fp16 = Classifier.open(trained, device="cpu", precision="fp16").probabilities(images)
    assert (full.argmax(1) == fp16.argmax(1)).mean() >= 0.95


def test_int8_file_is_calibrated_on_training_images_and_measured_on_the_cpu(trained, small_digits_folder,
                                                                            digit_files):
    """Written by default: ranges from the training images, agreement on the validation set.

    The tiny model trains for three epochs, and a few validation images sit within 0.03 of a
    tie between two labels; int8 rounding moves probabilities by up to about 0.04, so whether
    such an image flips depends on the trained weights, which differ between CPUs (the flips are
    the same with ONNX Runtime's integer kernels as with the quantized graph run in fp32). What
    holds everywhere: the probability error is bounded, the card's record is what the files
    give, and ``auto`` serves int8 on the CPU only when that record clears the bar."""
    card = open_package(trained).card
    int8 = card.int8
    assert int8.source == "validation" and int8.device == "cpu" and int8.images == card.metrics.valid_count
    assert set(int8.top1_agreement) == {"onnx"}
    assert int8.max_abs_diff["onnx"] < 0.1, int8
    assert card.export.int8_calibration_images == card.metrics.train_count  # fewer than 256: all of them

    valid = sorted((small_digits_folder / "val").rglob("*.png"))
    full = Classifier.open(trained, device="cpu", precision="fp32").probabilities_of_files(valid, "none")
    quant = Classifier.open(trained, device="cpu", precision="int8").probabilities_of_files(valid, "none")
    assert int8.top1_agreement["onnx"] == pytest.approx((full.argmax(1) == quant.argmax(1)).mean())
    assert int8.max_abs_diff["onnx"] == pytest.approx(float(np.abs(full - quant).max()), abs=1e-6)
    images = [f.read_bytes() for f in digit_files[:24]]  # other digits too: labels the model lacks
    unseen = Classifier.open(trained, device="cpu", precision="fp32").probabilities(images)
    assert np.abs(unseen - Classifier.open(trained, device="cpu", precision="int8").probabilities(images)).max() < 0.1
    served = Classifier.open(trained, device="cpu").runtime.precision
    assert served == ("int8" if int8.holds("onnx") else "fp32")


def test_photos_sent_to_a_digit_model_are_flagged_out_of_distribution(trained, small_digits_folder, photos):
    """The demo's limitation made visible: a photo gets a digit label, and an ood flag."""
    clf = Classifier.open(trained, device="cpu")
    valid = sorted((small_digits_folder / "val").rglob("*.png"))
    for policy in clf.card.tta.policies():
        flagged = [r.ood.out_of_distribution for r in clf.classify([p.read_bytes() for p in photos], tta=policy)]
        assert flagged == [True] * len(photos), policy
        digits = clf.classify([p.read_bytes() for p in valid], tta=policy)
        assert sum(r.ood.out_of_distribution for r in digits) <= 1, policy  # 99th percentile of 36
    inverted = ImageOps.invert(Image.open(valid[0]).convert("RGB"))  # white ink on black
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG")
    (result,) = clf.classify([buffer.getvalue()])
    assert result.ood.out_of_distribution and result.ood.distance > result.ood.threshold


def test_dataset_stats_are_measured_on_the_training_images(small_digits_folder, tmp_path, capsys):
    from torchvision.transforms import v2

    # one stage at the final size and no int8 file: the stats are all this test reads
    card = _train(small_digits_folder, tmp_path / "pkg", "--normalization", "dataset", "--no-int8",
                  stages="32:1:32:1e-2")
    assert "batch" not in capsys.readouterr().err  # not on a terminal: no lines within an epoch
    pixels = []
    for path in sorted((small_digits_folder / "train").rglob("*.png")):
        img = v2.CenterCrop(32)(v2.Resize(32)(Image.open(path).convert("RGB")))
        pixels.append(np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255)
    allpx = np.concatenate(pixels)
    assert np.allclose(card["normalization"]["mean"], allpx.mean(0), atol=1e-4)
    assert np.allclose(card["normalization"]["std"], allpx.std(0), atol=1e-4)


def test_imagenette_preset_on_a_local_folder_with_its_layout(tmp_path):
    from sklearn.datasets import load_digits

    from training.digits import digit_image
    from training.pipeline import train_package
    from training.recipe import load_recipe

    digits = load_digits()
    wnids = {"n01440764": 0, "n03888605": 1}  # tench, parachute
    classes = {w: [digit_image(digits.images[i], size=40) for i in np.flatnonzero(digits.target == d)[:24]]
               for w, d in wnids.items()}
    folder = make_image_folder(tmp_path / "imagenette2-320", classes, valid_name="val")
    recipe = load_recipe(preset="imagenette", overrides={
        "data": str(folder), "arch": "xresnet18", "int8": False,
        "stages": [{"size": 32, "epochs": 1, "batch_size": 16, "lr": 1e-2}]})
    assert recipe.normalization == "imagenet" and recipe.label_smoothing == 0.1
    card = train_package(recipe, tmp_path / "pkg").to_dict()
    assert card["labels"] == ["tench", "parachute"]
    assert card["training"]["dataset"]["name"] == "imagenette2-320"


def test_fastai_learner_converter_round_trip(small_digits_folder, tmp_path):
    import fastai.callback.all  # noqa: F401  (adds Learner.fit_one_cycle, no_bar)
    from fastai.data.transforms import Normalize
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastai.vision.augment import Resize
    from fastai.vision.core import PILImage, imagenet_stats
    from fastai.vision.data import ImageDataLoaders
    from fastai.vision.models.xresnet import xresnet18

    from sota_serve.errors import SotaServeError
    from training.convert import convert_learner

    dls = ImageDataLoaders.from_folder(small_digits_folder, train="train", valid="val", bs=16, num_workers=0,
                                       item_tfms=Resize(32), batch_tfms=Normalize.from_stats(*imagenet_stats))
    learn = Learner(dls, xresnet18(n_out=3), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-2)
    learn.export(tmp_path / "learner.pkl")

    with pytest.raises(SotaServeError, match="--trust"):
        convert_learner(tmp_path / "learner.pkl", tmp_path / "pkg", trust=False)
    card = convert_learner(tmp_path / "learner.pkl", tmp_path / "pkg", trust=True)
    assert card.labels == ["0", "1", "7"] and card.input.height == 32
    assert np.allclose(card.normalization.mean, imagenet_stats[0])

    clf = Classifier.open(tmp_path / "pkg", device="cpu")
    assert clf.runtime.precision == "fp32" and "onnx-int8" not in card.artifacts
    files = sorted((small_digits_folder / "val").rglob("*.png"))
    ours = clf.probabilities([f.read_bytes() for f in files])
    for f, p in zip(files, ours, strict=True):
        with learn.no_bar():
            _, idx, probs = learn.predict(PILImage.create(f))
        assert int(idx) == int(p.argmax())
        assert np.abs(probs.numpy() - p).max() < 1e-3

    # with a folder of images to calibrate on, an int8 file too, close to fp32
    card = convert_learner(tmp_path / "learner.pkl", tmp_path / "pkg8", trust=True,
                           calibration=small_digits_folder / "train")
    assert "onnx-int8" in card.artifacts and card.export.int8_calibration_images > 0
    int8 = Classifier.open(tmp_path / "pkg8", device="cpu", precision="int8").probabilities(
        [f.read_bytes() for f in files])
    assert (int8.argmax(1) == ours.argmax(1)).mean() >= 0.9
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(SotaServeError, match="no images found"):
        convert_learner(tmp_path / "learner.pkl", tmp_path / "pkg9", trust=True, calibration=empty)
    with pytest.raises(SotaServeError, match="no such folder"):
        convert_learner(tmp_path / "learner.pkl", tmp_path / "pkg9", trust=True, calibration=tmp_path / "none")


def test_demo_reaches_target_accuracy_and_imports(tmp_path):
    """The README's demo, end to end: >= 98.5% validation accuracy, parity >= 99%."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "SOTA_SERVE_CACHE": str(tmp_path / "cache"),
           "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "sota-demo"
    done = subprocess.run([sys.executable, "-m", "sota_serve.cli", "demo", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["accuracy"] >= 0.985, card["metrics"]
    assert card["parity"]["top1_agreement"] >= 0.99
    # the int8 file the server picks on a CPU agrees with fp32 on the validation set
    assert card["int8"]["top1_agreement"]["onnx"] >= 0.99 and card["int8"]["source"] == "validation"
    assert card["license"] == "cc-by-4.0" and "license: \"cc-by-4.0\"" in (out / "README.md").read_text()
    assert card["ood"]["policies"]["none"]["valid_flag_rate"] <= 0.02
    assert "imported into the BentoML model store as sota-demo:" in done.stdout
    listed = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "models", "get", "sota-demo:latest",
                             "-o", "json"], env=env, capture_output=True, text=True)
    assert json.loads(listed.stdout)["metadata"]["accuracy"] >= 0.985

    # predict on real digit images from the validation split: they come out right
    val = sorted((tmp_path / "cache" / "digits" / "val").rglob("*.png"))[::12]
    result = subprocess.run([sys.executable, "-m", "sota_serve.cli", "predict", str(out), *map(str, val),
                             "--json", "--top-k", "1"], env=env, capture_output=True, text=True, check=True)
    predicted = [r["predictions"][0]["label"] for r in json.loads(result.stdout)]
    truth = [p.parent.name for p in val]
    assert np.mean([a == b for a, b in zip(predicted, truth, strict=True)]) >= 0.95


def test_tta_default_needs_a_gain_above_the_noise():
    from training.evaluate import choose_default, paired_gain

    base = np.array([True] * 80 + [False] * 20)
    few = base.copy()
    few[80:83] = True  # 3 more right: within the noise of 100 images
    many = base.copy()
    many[80:98] = True
    many[0:2] = False  # 18 won, 2 lost
    gains = {"flip": paired_gain(base, few), "ten_crop": paired_gain(base, many),
             "five_crop": paired_gain(base, many)}
    assert gains["flip"] == {"gain": 0.03, "wins": 3, "losses": 0, "significant": False}
    assert gains["ten_crop"]["significant"] and gains["ten_crop"]["gain"] == pytest.approx(0.16)
    calls = {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10}
    accuracy = {"none": 0.8, "flip": 0.83, "five_crop": 0.96, "ten_crop": 0.96}
    assert choose_default(accuracy, gains, calls) == "five_crop"  # a tie goes to fewer calls
    assert choose_default(accuracy, {"flip": gains["flip"]}, calls) == "none"


def test_a_model_trained_without_a_name_is_named_after_its_folder_and_each_step_is_said(
        small_digits_folder, tmp_path, capsys, caplog, monkeypatch):
    """``train --data "My Digits"``: the model is ``my-digits``, not ``model``; after the
    training, each evaluation and export step says so on stderr. On a terminal (forced here,
    with a line per batch instead of one every 10 s), each epoch says how far it is; the
    exporters' own INFO and WARNING records stay out of the log."""
    import logging
    import re
    import shutil

    import training.train
    from training.quiet import EXPORT_LOGGERS

    monkeypatch.setattr(training.train, "interactive", lambda: True)
    monkeypatch.setattr(training.train, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    folder = tmp_path / "My Digits"
    shutil.copytree(small_digits_folder, folder)
    out = tmp_path / "pkg"
    assert cli(["train", "--data", str(folder), "--stages", TINY_STAGES, "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "my-digits" and card["training"]["recipe"]["name"] == "my-digits"
    said = capsys.readouterr()
    line = re.compile(r"epoch (\d) \(stage (\d), (\d+)px\): (batch|validation batch) (\d+)/(\d+)(, loss \d+\.\d{4})?, \d+s")
    lines = said.err.splitlines()
    progress = [m.groups() for m in map(line.fullmatch, lines) if m]
    # 108 training images in batches of 32 (the last, short one dropped), 36 validation images
    assert {(e, s, px, phase, n) for e, s, px, phase, _, n, _ in progress} == {
        ("1", "1", "24", "batch", "3"), ("1", "1", "24", "validation batch", "2"),
        ("2", "2", "32", "batch", "3"), ("2", "2", "32", "validation batch", "2"),
        ("3", "2", "32", "batch", "3"), ("3", "2", "32", "validation batch", "2")}, said.err
    assert all((loss is not None) == (phase == "batch") for _, _, _, phase, _, _, loss in progress)
    last = max(i for i, text in enumerate(lines) if line.fullmatch(text))
    assert last < lines.index("fastai evaluation on 36 validation images ...")  # evaluation: silent
    chatter = [r for r in caplog.records if r.levelno < logging.ERROR
               and any(r.name == n or r.name.startswith(n + ".") for n in EXPORT_LOGGERS)]
    assert not chatter, [f"{r.name}: {r.getMessage()}" for r in chatter]
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "sota_serve.training"][:2] == [
        "dataset My Digits: 108 train, 36 valid images, 3 classes", "epoch 1"]
    assert f"({card['name']}:" in said.out  # the summary's tag
    steps = [line.removesuffix(" ...") for line in said.err.splitlines() if line.endswith(" ...")]
    want = ["fastai evaluation on 36 validation images", "export onnx fp32", "export torchscript fp32",
            "int8 calibration: onnx on 108 images", "export parity:", "evaluate tta none",
            "OOD fit on 108 training images", "int8 agreement with fp32 on 36 validation images (cpu)",
            "write the package to"]
    at = [next((i for i, s in enumerate(steps) if s.startswith(w)), None) for w in want]
    assert None not in at and at == sorted(at), steps
    tta = [s for s in steps[at[5]:at[6]] if s.startswith("evaluate tta ")]  # the edge search, then each policy
    assert {s.split()[2] for s in tta} == {"none", "flip", "five_crop", "ten_crop"}, steps


def test_ctrl_c_says_so_in_one_line_and_leaves_the_destination_as_it_was(small_digits_folder, tmp_path):
    """SIGINT to a real ``sota-serve train`` while it writes the package (its first export):
    one line, exit status 130 as a shell reports Ctrl-C, no traceback; the destination holds
    what it held before, and no partial folder is left beside it."""
    import signal

    out = tmp_path / "packages" / "pkg"
    out.mkdir(parents=True)
    (out / "card.json").write_text('{"old": true}')
    # Python's own SIGINT handler, as a command started from a terminal has it (a job that a
    # shell starts in the background inherits SIGINT ignored, and Python then leaves it so)
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from sota_serve.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "train", "--data", str(small_digits_folder), "--stages", "24:1:32:1e-2",
         "--no-int8", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    before = []
    for line in proc.stderr:  # the package is being written from the first export on
        before.append(line)
        if line.startswith("export onnx fp32"):
            proc.send_signal(signal.SIGINT)
            break
    _, after = proc.communicate(timeout=300)
    err = "".join(before) + after
    assert proc.returncode == 130, err
    assert "Traceback" not in err and after.strip().splitlines() == [
        f"sota-serve train: interrupted; nothing was written to {out}"], err
    assert sorted(p.name for p in out.parent.iterdir()) == ["pkg"]  # no partial folder beside it
    assert [p.name for p in out.iterdir()] == ["card.json"] and (out / "card.json").read_text() == '{"old": true}'
