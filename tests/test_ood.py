"""The out-of-distribution features: the fast integer implementation against the definition."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sota_serve.image.ood import N_FEATURES, features
from sota_serve.image.preprocess import tta_crops


def defined(crops: np.ndarray) -> np.ndarray:
    """The features as the module's docstring defines them, in float64, statistic by statistic."""
    x = crops.astype(np.float64).mean(0) / 255.0  # (3, H, W): the mean of the crops
    gray = x.mean(0)
    r = np.linspace(0, gray.shape[0], 5).astype(int)  # the 4x4 grid's cell boundaries
    c = np.linspace(0, gray.shape[1], 5).astype(int)
    thumb = np.array([[gray[r[i]:r[i + 1], c[j]:c[j + 1]].mean() for j in range(4)] for i in range(4)])
    flat = x.reshape(3, -1)
    colour = np.abs(x[0] - x[1]).mean() + np.abs(x[1] - x[2]).mean()
    return np.concatenate([thumb.ravel(), flat.mean(1), flat.std(1), [colour]])


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("size", [(64, 64), (224, 224), (37, 53), (5, 4)])
def test_features_equal_their_definition(k, size):
    rng = np.random.default_rng(k * 1000 + size[0])
    crops = rng.integers(0, 256, (k, 3, *size), dtype=np.uint8)
    got = features(crops)
    assert got.shape == (N_FEATURES,) and got.dtype == np.float64
    np.testing.assert_allclose(got, defined(crops), rtol=0, atol=1e-12)


def test_features_of_real_photos_and_extreme_images(photos):
    images = [Image.open(p).convert("RGB") for p in photos]
    images += [Image.new("RGB", (300, 200), (255, 255, 255)), Image.new("RGB", (300, 200), (0, 0, 0))]
    for img in images:
        for policy, k in (("none", 1), ("five_crop", 5), ("ten_crop", 10)):
            crops = tta_crops(img, policy, 256, 224, 224)
            assert crops.shape[0] == k
            np.testing.assert_allclose(features(crops), defined(crops), rtol=0, atol=1e-12)
    flat = features(np.full((5, 3, 224, 224), 255, dtype=np.uint8))
    assert np.all(flat[19:22] == 0.0) and np.all(flat[16:19] == 1.0)  # no spread, white, grey


def test_torch_tensors_give_the_numpy_features():
    torch = pytest.importorskip("torch")
    crops = np.random.default_rng(3).integers(0, 256, (5, 3, 40, 40), dtype=np.uint8)
    np.testing.assert_allclose(features(torch.from_numpy(crops)), features(crops), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_a_batch_of_images_gets_each_image_s_features_and_checks_exactly(k):
    """The server computes a batch's features at once (on the model thread); the CLI, one
    image's. They must be the same numbers, bit for bit, and so the same OOD answers."""
    from sota_serve.image.ood import Detector, Screen, features_batch
    from sota_serve.tta import CROPS_PER_IMAGE

    rng = np.random.default_rng(k)
    n = 7
    crops = rng.integers(0, 256, (n * k, 3, 37, 53), dtype=np.uint8)
    batch = features_batch(crops, k)
    assert batch.shape == (n, N_FEATURES)
    for i in range(n):
        assert np.array_equal(batch[i], features(crops[i * k:(i + 1) * k]))
    policy = next(p for p, c in CROPS_PER_IMAGE.items() if c == k)
    fit = rng.normal(size=(200, N_FEATURES))
    detector = Detector(fit.mean(0), np.linalg.inv(np.cov(fit, rowvar=False)), threshold=5.0)
    screen = Screen({policy: detector})
    assert screen.check_batch(crops, policy) == [screen.check(crops[i * k:(i + 1) * k], policy) for i in range(n)]
    assert Screen({}).check_batch(crops, policy) is None  # no fit for the policy: nothing reported
    torch = pytest.importorskip("torch")
    assert np.array_equal(features_batch(torch.from_numpy(crops), k), batch)
