"""Decoding on the model's device (sota_serve.image.device_preprocess) against the Pillow path.

CI has no GPU, so the same code runs on the CPU here (torchvision's libjpeg decode, torch's
resize): every step but nvJPEG itself is checked. The ``gpu`` tests check nvJPEG on a CUDA
device (``make test-gpu``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sota_serve.classifier import Classifier
from sota_serve.errors import BadRequestError, ImageTooLargeError, InvalidImageError
from sota_serve.image.decode import DecodeLimits, read_header
from sota_serve.image.device_preprocess import DevicePreprocessor, concat_rows, unavailable_reason
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.loading import open_package
from sota_serve.runtime import load_runtime
from sota_serve.tta import POLICIES
from tests.helpers import encode, gradient_image

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
PRE = Preprocessor(height=224, width=224, resize_shortest_edge=256,
                   tta_edges={"flip": 256, "five_crop": 280, "ten_crop": 280})


def _max_diff(a, b) -> int:
    a = a if isinstance(a, np.ndarray) else a.cpu().numpy()
    b = b if isinstance(b, np.ndarray) else b.cpu().numpy()
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("tta", POLICIES)
def test_photos_match_the_pillow_path_within_one_level(photos, tta):
    dev = DevicePreprocessor(PRE, "cpu")
    for p in photos:
        data = p.read_bytes()
        ours, pillow = dev(data, tta), PRE(data, tta)
        assert isinstance(ours, torch.Tensor) and ours.dtype == torch.uint8
        assert tuple(ours.shape) == pillow.shape
        assert _max_diff(ours, pillow) <= 1, p.name  # float resize vs Pillow's fixed point
    assert dev.counts == {"device": len(photos), "pillow": 0}


def test_upscaling_small_images_and_bicubic_cards():
    small = encode(gradient_image(97, 71), "JPEG", quality=95)
    assert _max_diff(DevicePreprocessor(PRE, "cpu")(small), PRE(small)) <= 1
    bicubic = Preprocessor(height=32, width=32, resize_shortest_edge=36, interpolation="bicubic")
    photo = encode(gradient_image(400, 300), "JPEG", quality=95)
    # Pillow rounds and clips between its two bicubic passes; torch does not.
    assert _max_diff(DevicePreprocessor(bicubic, "cpu")(photo), bicubic(photo)) <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_applies_it(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(gradient_image(300, 200), "JPEG", quality=95, exif=exif)
    assert read_header(data).orientation == orientation
    dev = DevicePreprocessor(PRE, "cpu")
    for tta in POLICIES:
        assert _max_diff(dev(data, tta), PRE(data, tta)) <= 1
    assert dev.counts["device"] == len(POLICIES)


def test_grayscale_jpeg_becomes_rgb():
    data = encode(gradient_image(300, 200, "L"), "JPEG")
    dev = DevicePreprocessor(PRE, "cpu")
    assert _max_diff(dev(data), PRE(data)) <= 1 and dev.counts["device"] == 1


def _progressive() -> bytes:
    return encode(gradient_image(300, 200), "JPEG", progressive=True)


@pytest.mark.parametrize("make", [
    lambda: encode(gradient_image(300, 200), "PNG"),
    lambda: encode(gradient_image(300, 200, "CMYK"), "JPEG"),
    _progressive,
    lambda: encode(gradient_image(300, 200), "JPEG") + b"trailing bytes",
], ids=["png", "cmyk-jpeg", "progressive-jpeg", "data-after-the-end"])
def test_what_the_device_cannot_take_goes_through_pillow(make):
    data = make()
    dev = DevicePreprocessor(PRE, "cpu")
    ours = dev(data)
    assert dev.counts == {"device": 0, "pillow": 1}
    assert _max_diff(ours, PRE(data)) == 0  # it is the Pillow path's output, uploaded


def test_truncated_and_oversized_jpegs_fail_as_on_the_pillow_path():
    dev = DevicePreprocessor(PRE, "cpu")
    data = encode(gradient_image(300, 200), "JPEG")
    with pytest.raises(InvalidImageError, match="damaged"):
        dev(data[: len(data) // 2])
    small = DevicePreprocessor(Preprocessor(height=32, width=32, resize_shortest_edge=36,
                                            limits=DecodeLimits(max_pixels=10_000)), "cpu")
    with pytest.raises(ImageTooLargeError, match="pixels"):
        small(data)
    with pytest.raises(BadRequestError, match="unknown tta"):
        dev(data, "twelve_crop")
    assert dev.counts == {"device": 0, "pillow": 1}  # the truncated file: Pillow raised


def test_many_keeps_order_and_fails_only_the_bad_images(photos):
    good = [p.read_bytes() for p in photos]
    images = [good[0], b"not an image", good[1], good[2][:3000], encode(gradient_image(300, 200), "PNG")]
    dev = DevicePreprocessor(PRE, "cpu")
    out = dev.many(images, "five_crop")
    assert isinstance(out[1], InvalidImageError) and isinstance(out[3], InvalidImageError)
    for i in (0, 2, 4):
        assert tuple(out[i].shape) == (5, 3, 224, 224)
        assert _max_diff(out[i], PRE(images[i], "five_crop")) <= 1


def test_concat_rows_keeps_numpy_and_uploads_to_a_tensor_device():
    a = np.zeros((2, 3, 4, 4), np.uint8)
    assert isinstance(concat_rows([a, a]), np.ndarray) and concat_rows([a]) is a
    t = torch.ones((1, 3, 4, 4), dtype=torch.uint8)
    both = concat_rows([a, t])
    assert isinstance(both, torch.Tensor) and both.shape == (3, 3, 4, 4) and int(both.sum()) == 48


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_runtimes_take_tensors_and_padded_batches(tiny_package, backend):
    runtime = load_runtime(open_package(tiny_package), backend, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (15, 3, 32, 32), dtype=np.uint8)
    expected = runtime.predict(x, crops_per_image=5)
    assert np.allclose(runtime.predict(torch.from_numpy(x), crops_per_image=5), expected, atol=1e-6)
    runtime.pad_batches = True  # what CUDA runtimes do: 3 images run as 4
    assert runtime.buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert np.allclose(runtime.predict(x, crops_per_image=5), expected, atol=1e-6)
    assert np.allclose(runtime.predict(torch.from_numpy(x[:5]), crops_per_image=5), expected[:1], atol=1e-6)


def test_classifier_decoding_with_torchvision_agrees_with_pillow(tiny_package, photos):
    data = [p.read_bytes() for p in photos]
    pillow = Classifier.open(tiny_package, device="cpu")
    tv = Classifier.open(tiny_package, device="cpu", decode="torchvision")
    for tta in POLICIES:
        assert np.allclose(tv.probabilities(data, tta), pillow.probabilities(data, tta), atol=0.02)
    assert tv.device_preprocessor.counts["device"] == len(POLICIES) * len(photos)
    with pytest.raises(BadRequestError, match="unknown decode"):
        Classifier.open(tiny_package, decode="nvjpeg")


def test_availability_is_proven_by_decoding():
    assert unavailable_reason("cpu") is None
    if not CUDA:
        assert "CUDA" in unavailable_reason("cuda")


@gpu
@pytest.mark.parametrize("tta", POLICIES)
def test_nvjpeg_crops_stay_on_the_gpu_and_stay_close_to_pillow(photos, tta):
    dev = DevicePreprocessor(PRE, "cuda")
    for p in photos:
        data = p.read_bytes()
        ours = dev(data, tta)
        assert ours.device.type == "cuda"
        diff = np.abs(ours.cpu().numpy().astype(np.int16) - PRE(data, tta).astype(np.int16))
        # nvJPEG's IDCT and chroma upsampling are not libjpeg's: small, not zero.
        assert diff.mean() < 2.0, p.name
    assert dev.counts["device"] == len(photos)


@gpu
def test_nvjpeg_orientation_and_progressive_jpegs():
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = gradient_image(300, 200)
    rotated = encode(stored, "JPEG", quality=95, exif=exif)
    dev = DevicePreprocessor(PRE, "cuda")
    ours, upright = dev(rotated).cpu().numpy().astype(int), PRE(rotated).astype(int)
    unturned = PRE(encode(stored, "JPEG", quality=95)).astype(int)
    # This synthetic image is all sharp edges, where nvJPEG's chroma upsampling differs most
    # from libjpeg's: up to 5 levels on average. Left unturned, the crops would differ an order
    # of magnitude more than the turned ones do.
    turned = np.abs(ours - upright).mean()
    assert turned < 5
    assert 10 * turned < np.abs(ours - unturned).mean()
    assert dev.counts["device"] == 1
    dev(_progressive())  # goes through Pillow, uploaded
    assert dev.counts["pillow"] == 1


@gpu
def test_onnx_reads_gpu_crops_in_place(tiny_package, photos):
    runtime = load_runtime(open_package(tiny_package), "onnx", device="cuda")
    dev = DevicePreprocessor(Preprocessor.from_card(runtime.card), "cuda")
    crops = concat_rows([dev(p.read_bytes(), "five_crop") for p in photos])
    assert crops.device.type == "cuda"
    expected = runtime.predict(crops.cpu().numpy(), crops_per_image=5)
    assert np.allclose(runtime.predict(crops, crops_per_image=5), expected, atol=1e-5)


def test_jpeg_buffers_are_real_jpegs():  # guards the fixtures above
    data = encode(gradient_image(300, 200), "JPEG")
    assert Image.open(io.BytesIO(data)).format == "JPEG" and data.endswith(b"\xff\xd9")
