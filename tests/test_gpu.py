"""What runs differently on a CUDA device, against the CPU reference: ONNX Runtime's CUDA
provider with IO binding and the crops averaged on the device, fp16 files, batches padded to
power-of-two buckets, decoding with nvJPEG, and a server whose plan shares one GPU between
several workers.

Marked ``gpu``: ``make test`` leaves these out; ``make test-gpu`` runs them (with the CUDA tests of
tests/test_device_preprocess.py), and each fails, saying no CUDA device was found, on a machine
without one (tests/conftest.py).

The model is the tiny CNN with a tenth of its usual classifier weights (``gpu_package``), so that
its answers are not saturated: on the CPU a crop averaged into the wrong image, a swapped
channel order or a batch shifted by one row changes its probabilities by 0.008 to 0.02, while
its fp16 file differs from fp32 by under 1e-4. The tolerances below sit between the two.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import time

import httpx
import numpy as np
import pytest
import torch

from bench.server import Server
from sota_serve.building.export import export_package
from sota_serve.classifier import Classifier
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from sota_serve.runtime import load_runtime
from sota_serve.serving.settings import Settings
from sota_serve.tta import CROPS_PER_IMAGE
from tests.helpers import card_dict, tiny_cnn

pytestmark = pytest.mark.gpu

#: fp32 on CUDA against fp32 on the CPU: other convolution algorithms, TF32 on by default in
#: ONNX Runtime's CUDA provider and in cuDNN under torch (10-bit mantissa, as fp16's)
FP32_ATOL = 2e-3
#: fp16 on CUDA against fp32 on the CPU: fp16 arithmetic, where a kernel also accumulates in it
FP16_ATOL = 3e-3
#: the same file on the same device, the same batch shape: numpy in, or a tensor on the device in
SAME_ATOL = 1e-5
#: nvJPEG against libjpeg: the crops differ by under 2 levels on average
NVJPEG_ATOL = 5e-3
BACKENDS = ("onnx", "pt2", "torchscript")


@pytest.fixture(scope="module")
def gpu_package(tmp_path_factory, photos):
    """The tiny CNN, less confident, with fp32 and fp16 files of every format and every TTA
    policy on its card; the fp16 record (measured at export, on the CPU) lets ``auto`` serve
    fp16 on a GPU."""
    model = tiny_cnn()
    with torch.no_grad():
        model[-1].weight.mul_(0.2)
    out = tmp_path_factory.mktemp("gpu-package")
    card = ModelCard.parse(card_dict())
    check = np.concatenate([Preprocessor.from_card(card)(p.read_bytes()) for p in photos])
    export_package(model, card, out, check_inputs=check, fp16=True)
    return out


@pytest.fixture(scope="module")
def logits_package(tmp_path_factory):
    """A card whose model outputs logits: softmax joins the reduce graph on the device."""
    model = tiny_cnn()
    with torch.no_grad():
        model[-1].weight.mul_(0.2)
    out = tmp_path_factory.mktemp("gpu-logits")
    export_package(model, ModelCard.parse(card_dict(output="logits")), out)
    return out


def _batch(images: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (images * k, 3, 32, 32), dtype=np.uint8)


def _runtimes(package, backend: str = "onnx", precision: str = "fp32"):
    opened = open_package(package)
    cpu = load_runtime(opened, backend, device="cpu", precision="fp32")
    cuda = load_runtime(opened, backend, device="cuda", precision=precision)
    return cpu, cuda


def test_onnx_runs_on_the_cuda_provider_with_padded_batches(gpu_package):
    _, cuda = _runtimes(gpu_package)
    # no silent fall back to the CPU, for the model nor for the graph that averages the crops
    assert cuda.device == "cuda" and cuda.providers[0] == "CUDAExecutionProvider"
    assert cuda._reduce.get_providers()[0] == "CUDAExecutionProvider"
    assert cuda.pad_batches and cuda.buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("k", sorted(set(CROPS_PER_IMAGE.values())))
def test_onnx_on_cuda_answers_as_the_cpu_at_every_batch_size(gpu_package, k):
    """Batches of 1 to 9 images (padded to 1, 2, 4, 8 and 16 on CUDA), k crops each averaged
    on the device: the CPU's probabilities, and the same from numpy as from a CUDA tensor
    (IO binding reads the tensor's memory in place)."""
    cpu, cuda = _runtimes(gpu_package)
    x = _batch(9, k, seed=k)
    for n in range(1, 10):
        rows = x[: n * k]
        want = cpu.predict(rows, crops_per_image=k)
        got = cuda.predict(rows, crops_per_image=k)
        assert got.shape == (n, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=FP32_ATOL, err_msg=f"{n} images of {k} crops")
        on_device = torch.from_numpy(rows).cuda()
        np.testing.assert_allclose(cuda.predict(on_device, crops_per_image=k), got, atol=SAME_ATOL)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_crops_are_averaged_on_the_device_after_softmax(logits_package, k):
    """A logits model: softmax and the mean over each image's k crops run in the reduce graph on
    the CUDA provider, and give the mean of the crops' own probabilities."""
    cpu, cuda = _runtimes(logits_package)
    assert cuda._reduce.get_providers()[0] == "CUDAExecutionProvider"
    x = _batch(6, k, seed=10 + k)
    grouped = cuda.predict(x, crops_per_image=k)
    per_crop = cuda.predict(x)  # k = 1 of a logits model: softmax alone, on the device
    np.testing.assert_allclose(per_crop.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(grouped, per_crop.reshape(6, k, 3).mean(1), atol=FP32_ATOL)
    np.testing.assert_allclose(grouped, cpu.predict(x, crops_per_image=k), atol=FP32_ATOL)


def test_warming_every_bucket_of_the_gpu_plan_then_serving_any_size(gpu_package):
    """The server's warm-up on a GPU: every bucket up to 128 plain images and 32 ten-crop ones;
    afterwards any batch size answers as the CPU does."""
    cpu, cuda = _runtimes(gpu_package)
    plan = Settings(device="cuda").plan()
    cuda.warmup(plan.max_batch_size, 1)
    cuda.warmup(plan.max_batch_size_tta, 10)
    for n, k in [(128, 1), (100, 1), (33, 1), (32, 10), (17, 10), (3, 5)]:
        x = _batch(n, k, seed=n)
        np.testing.assert_allclose(cuda.predict(x, crops_per_image=k), cpu.predict(x, crops_per_image=k),
                                   atol=FP32_ATOL, err_msg=f"{n} images of {k} crops")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_on_cuda_answers_as_the_cpu(gpu_package, photos, backend):
    images = [p.read_bytes() for p in photos]
    cpu = Classifier.open(gpu_package, backend=backend, device="cpu", precision="fp32")
    cuda = Classifier.open(gpu_package, backend=backend, device="cuda", precision="fp32")
    assert cuda.runtime.device == "cuda"
    if backend == "torchscript":
        assert cuda.runtime.channels_last  # cuDNN's NHWC kernels, the default on CUDA
    for tta in CROPS_PER_IMAGE:
        np.testing.assert_allclose(cuda.probabilities(images, tta), cpu.probabilities(images, tta),
                                   atol=FP32_ATOL, err_msg=tta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_serves_fp16_on_a_gpu_and_it_answers_as_fp32_on_the_cpu(gpu_package, photos, backend):
    images = [p.read_bytes() for p in photos]
    cpu = Classifier.open(gpu_package, backend=backend, device="cpu", precision="fp32")
    half = Classifier.open(gpu_package, backend=backend, device="cuda")  # precision auto
    assert (half.runtime.device, half.runtime.precision) == ("cuda", "fp16")
    for tta in ("none", "five_crop", "ten_crop"):
        got, want = half.probabilities(images, tta), cpu.probabilities(images, tta)
        assert got.dtype == np.float32 and np.isfinite(got).all()
        assert (got.argmax(1) == want.argmax(1)).all(), tta
        np.testing.assert_allclose(got, want, atol=FP16_ATOL, err_msg=tta)


def test_nvjpeg_decoding_feeds_the_cuda_runtime_as_pillow_feeds_the_cpu(gpu_package, photos):
    images = [p.read_bytes() for p in photos]
    cpu = Classifier.open(gpu_package, device="cpu", precision="fp32")
    nvjpeg = Classifier.open(gpu_package, device="cuda", precision="fp32", decode="torchvision")
    assert nvjpeg.crops(images[0], "five_crop").device.type == "cuda"
    for tta in CROPS_PER_IMAGE:
        np.testing.assert_allclose(nvjpeg.probabilities(images, tta), cpu.probabilities(images, tta),
                                   atol=NVJPEG_ATOL, err_msg=tta)
    # every photo is a baseline JPEG: none went through Pillow
    assert nvjpeg.device_preprocessor.counts == {"device": 1 + len(CROPS_PER_IMAGE) * len(images), "pillow": 0}


def _classify(url: str, data: bytes, tta: str) -> dict:
    r = httpx.post(f"{url}/classify", files={"image": ("photo.jpg", io.BytesIO(data))},
                   data={"tta": tta, "top_k": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_server_with_the_default_gpu_plan_shares_the_gpu_between_workers(gpu_package, photos, tmp_path):
    """``bentoml serve`` with nothing set on a GPU machine: the plan's workers (half the cores,
    at most 8) each load the fp16 file on the GPU, and answers from all of them under concurrent
    load are the offline classifier's."""
    cores = os.cpu_count() or 1
    plan = Settings(device="auto").plan()
    assert (plan.device, plan.workers, plan.threads, plan.model_threads) == ("cuda", max(1, min(8, cores // 2)), 1, 1)
    assert (plan.max_batch_size, plan.max_batch_size_tta) == (128, 32)
    offline = Classifier.open(gpu_package, device="cuda")
    jobs = [(p.read_bytes(), tta) for p in photos for tta in ("none", "five_crop", "ten_crop")] * 8
    with Server(gpu_package, home=tmp_path / "home", env={"SOTA_SERVE_DEVICE": "auto"}) as server:
        deadline = time.monotonic() + 120  # /readyz answers once one worker is ready
        while len(re.findall(r"ready: serving \S+ on cuda, fp16, decode pillow", server.output())) < plan.workers:
            assert time.monotonic() < deadline, server.output()[-4000:]
            time.sleep(0.5)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda job: _classify(server.url, *job), jobs))
        log = server.output()
    assert len(re.findall(r"ready: serving \S+ on cuda, fp16, decode pillow", log)) == plan.workers
    assert repr(plan) in log
    for (data, tta), answer in zip(jobs, answers, strict=True):
        want = offline.probabilities([data], tta)[0]
        got = {p["label"]: p["score"] for p in answer["predictions"]}
        assert answer["tta"] == tta and len(got) == 3
        for i, label in enumerate(offline.card.labels):
            assert abs(got[label] - want[i]) < FP16_ATOL, (tta, label, got, want)
