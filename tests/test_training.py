"""Real fastai training on small local data (real scikit-learn digits), no downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sota_serve.classifier import Classifier
from sota_serve.cli import main as cli
from sota_serve.constants import IMAGENET_MEAN, IMAGENET_STD
from sota_serve.package import open_package
from tests.conftest import make_image_folder

pytestmark = pytest.mark.slow

TINY_STAGES = "24:1:32:1e-2,32:1:32:5e-3"


def _train(folder: Path, out: Path, *extra: str) -> dict:
    assert cli(["train", "--data", str(folder), "--arch", "xresnet18", "--stages", TINY_STAGES,
                "--mixup", "0.2", "--label-smoothing", "0.1", "--name", "tiny-digits", "--out", str(out),
                *extra]) == 0
    return json.loads((out / "card.json").read_text())


def test_train_writes_a_complete_package_with_imagenet_stats(small_digits_folder, tmp_path):
    card = _train(small_digits_folder, tmp_path / "pkg", "--normalization", "imagenet")
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
    for key in ("accuracy", "accuracy_five_crop", "accuracy_fastai_tta", "valid_loss"):
        assert 0 <= metrics[key] <= max(1, metrics[key])
    assert metrics["accuracy"] == metrics["accuracy_fastai_pipeline"]
    assert metrics["valid_count"] == 36 and metrics["train_count"] == 108
    assert card["parity"]["top1_agreement"] >= 0.99 and card["parity"]["max_abs_diff"] < 1e-3
    assert card["input"]["height"] == 32 and card["tta"]["five_crop"]["resize_shortest_edge"] in (37, 40)
    assert card["training"]["dataset"]["fingerprint"]
    package = open_package(tmp_path / "pkg")
    assert package.verified and set(package.backends) == {"onnx", "torchscript"}
    readme = (tmp_path / "pkg" / "README.md").read_text()
    assert "five-crop TTA" in readme and "Training history" in readme and "parity" in readme
    for png in ("training_curve.png", "confusion_matrix.png"):
        assert Image.open(tmp_path / "pkg" / png).size[0] > 100


def test_dataset_stats_are_measured_on_the_training_images(small_digits_folder, tmp_path):
    from torchvision.transforms import v2

    card = _train(small_digits_folder, tmp_path / "pkg", "--normalization", "dataset")
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
        "data": str(folder), "arch": "xresnet18",
        "stages": [{"size": 32, "epochs": 1, "batch_size": 16, "lr": 1e-2}]})
    assert recipe.normalization == "imagenet" and recipe.label_smoothing == 0.1
    card = train_package(recipe, tmp_path / "pkg").to_dict()
    assert card["labels"] == ["tench", "parachute"]
    assert card["training"]["dataset"]["name"] == "imagenette2-320"


def test_fastai_learner_converter_round_trip(small_digits_folder, tmp_path):
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
    files = sorted((small_digits_folder / "val").rglob("*.png"))
    ours = clf.probabilities([f.read_bytes() for f in files])
    for f, p in zip(files, ours, strict=True):
        with learn.no_bar():
            _, idx, probs = learn.predict(PILImage.create(f))
        assert int(idx) == int(p.argmax())
        assert np.abs(probs.numpy() - p).max() < 1e-3


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
