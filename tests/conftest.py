from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.server import Server
from tests.helpers import PHOTOS, card_dict, tiny_cnn

#: Set (to anything but 0) by CI: a test that skips fails instead, with the skip's reason, so
#: that a run missing a browser, podman or a network namespace cannot pass.
STRICT = "SOTA_SERVE_TEST_STRICT"
#: Tests that need a CUDA device: left out unless ``-m`` names this marker (``make test-gpu``).
GPU = "gpu"


def strict() -> bool:
    return os.environ.get(STRICT, "") not in ("", "0")


def _skip_reason(longrepr: object) -> str:
    # a skip's longrepr is (file, line, "Skipped: reason")
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(reason).removeprefix("Skipped: ")


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and strict() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{STRICT}={os.environ[STRICT]}: a skip fails this run: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level skip (importorskip at import) is a skipped collection
    _fail_skip(report)
    return report


def _gpu_selected(config: pytest.Config) -> bool:
    """Whether ``-m`` names the marker (``gpu``, ``not gpu``, ``gpu and not slow``): then the
    expression alone decides."""
    return re.search(rf"\b{GPU}\b", config.option.markexpr or "") is not None


def pytest_collection_modifyitems(config, items):
    """Deselect the ``gpu`` tests unless ``-m`` names the marker: deselected tests are not
    skips, so a CPU machine's strict run leaves them out without failing, whatever other ``-m``
    it is given (``make test-fast``'s ``not slow``)."""
    if _gpu_selected(config):
        return
    gpu = [item for item in items if item.get_closest_marker(GPU)]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker(GPU)]
        config.hook.pytest_deselected(items=gpu)


def pytest_report_header(config):
    if not _gpu_selected(config):
        return f"{GPU} tests: deselected (run them with -m {GPU}: make test-gpu)"
    from sota_serve.device import cuda_device_count

    return f"{GPU} tests: as -m says; CUDA devices here: {cuda_device_count()}"


def pytest_runtest_setup(item):
    """A ``gpu`` test fails, never skips, where no CUDA device is found: ``make test-gpu`` on
    the wrong machine must not look like a pass."""
    if item.get_closest_marker(GPU):
        from sota_serve.device import cuda_device_count

        if cuda_device_count() == 0:
            pytest.fail("no CUDA device was found (the driver reports none); the gpu tests need one",
                        pytrace=False)


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    for p in PHOTOS:
        assert p.is_file(), f"missing test photo {p}"
    return PHOTOS


def digit_ood(card_data: dict) -> dict:
    """An ``ood`` section fitted on real sklearn digits (300 to fit, 100 to calibrate), so that
    photos are out of distribution for the tiny test model, as for the demo."""
    from sklearn.datasets import load_digits

    from sota_serve.image import ood
    from sota_serve.image.preprocess import Preprocessor
    from sota_serve.package.card import ModelCard
    from training.digits import digit_image

    pre = Preprocessor.from_card(ModelCard.parse(card_data))
    images = [digit_image(d) for d in load_digits().images[:400]]
    fits = {}
    for policy in pre.policies:
        vectors = np.stack([ood.features(pre.crops(img, policy)) for img in images])
        fits[policy] = ood.fit_policy(vectors[:300], vectors[300:], percentile=99.0)
    return ood.spec(fits, percentile=99.0, fit_images=300, calibration_images=100)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, photos) -> Path:
    """A real exported package: tiny CNN, ONNX + pt2 + TorchScript, card with every TTA policy and
    an out-of-distribution fit on digits."""
    from sota_serve.building.export import export_package
    from sota_serve.image.preprocess import Preprocessor
    from sota_serve.package.card import ModelCard

    out = tmp_path_factory.mktemp("tiny-package")
    card = ModelCard.parse(card_dict(ood=digit_ood(card_dict())))
    pre = Preprocessor.from_card(card)
    check = np.concatenate([pre(p.read_bytes()) for p in photos])
    export_package(tiny_cnn(), card, out, check_inputs=check)
    return out


@pytest.fixture(scope="session")
def digit_files(tmp_path_factory) -> list[Path]:
    """Real handwritten digits (scikit-learn) written as PNG files, with their labels in the name."""
    from sklearn.datasets import load_digits

    from training.digits import digit_image

    out = tmp_path_factory.mktemp("digit-files")
    digits = load_digits()
    files = []
    for i in range(0, 40):
        path = out / f"{i:03d}_label{digits.target[i]}.png"
        digit_image(digits.images[i]).save(path)
        files.append(path)
    return files


def make_image_folder(root: Path, classes: dict[str, list[Image.Image]], valid_every: int = 4,
                      valid_name: str = "val") -> Path:
    for name, images in classes.items():
        for i, img in enumerate(images):
            split = valid_name if i % valid_every == 0 else "train"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def small_digits_folder(tmp_path_factory) -> Path:
    """Three digit classes (0, 1, 7) of real sklearn digits as an image folder."""
    from sklearn.datasets import load_digits

    from training.digits import digit_image

    digits = load_digits()
    classes: dict[str, list[Image.Image]] = {}
    for label in (0, 1, 7):
        idx = np.flatnonzero(digits.target == label)[:48]
        classes[str(label)] = [digit_image(digits.images[i], size=40) for i in idx]
    return make_image_folder(tmp_path_factory.mktemp("digits3"), classes)


@pytest.fixture(scope="session")
def tiny_cnn_at(tmp_path_factory, photos):
    """``tiny_cnn_at(size)``: the tiny CNN exported for size x size input (it is fully
    convolutional), for tests that need a model slower than the 32 px one."""
    from sota_serve.building.export import export_package
    from sota_serve.image.preprocess import Preprocessor
    from sota_serve.package.card import ModelCard

    def make(size: int) -> Path:
        out = tmp_path_factory.mktemp(f"tiny-{size}")
        card = ModelCard.parse(card_dict(
            input={"height": size, "width": size, "channels": "RGB", "layout": "NCHW", "dtype": "uint8"},
            preprocess={"exif_transpose": True, "resize_shortest_edge": size, "crop": "center",
                        "interpolation": "bilinear"},
            tta={"default": "none", "five_crop": {"resize_shortest_edge": size + size // 8}}))
        check = np.concatenate([Preprocessor.from_card(card)(p.read_bytes()) for p in photos])
        export_package(tiny_cnn(), card, out, check_inputs=check)
        return out

    return make


@pytest.fixture(scope="session")
def server(tiny_package, tmp_path_factory):
    srv = Server(tiny_package, home=tmp_path_factory.mktemp("bentoml-home"),
                 env={"SOTA_SERVE_DEVICE": "cpu"})  # otherwise the shipped defaults
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
