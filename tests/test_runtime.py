import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sota_serve.device import resolve_device
from sota_serve.errors import RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from sota_serve.runtime import load_runtime
from tests.helpers import card_dict, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_five_crop_average_equals_mean_of_single_runs(tiny_package, backend):
    runtime = load_runtime(open_package(tiny_package), backend, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (15, 3, 32, 32), dtype=np.uint8)
    single = runtime.predict(x)
    grouped = runtime.predict(x, crops_per_image=5)
    assert grouped.shape == (3, 3)
    assert np.allclose(grouped, single.reshape(3, 5, 3).mean(1), atol=1e-6)


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_every_tta_policy_is_the_mean_of_its_crops_probabilities(tiny_package, photos, backend):
    from sota_serve.classifier import Classifier
    from sota_serve.tta import CROPS_PER_IMAGE

    clf = Classifier.open(tiny_package, backend=backend, device="cpu")
    data = [p.read_bytes() for p in photos]
    for policy in clf.card.tta.policies():
        crops = np.concatenate([clf.preprocessor(d, policy) for d in data])
        assert crops.shape[0] == len(data) * CROPS_PER_IMAGE[policy]
        per_crop = clf.runtime.predict(crops)  # one probability vector per crop
        expected = per_crop.reshape(len(data), CROPS_PER_IMAGE[policy], -1).mean(1)
        assert np.abs(clf.probabilities(data, policy) - expected).max() < 1e-5, policy


def test_logits_models_get_softmax_in_the_runtime(tmp_path):
    from sota_serve.building.export import export_package

    card = ModelCard.parse(card_dict(output="logits"))
    export_package(tiny_cnn(), card, tmp_path)
    for backend in ("onnx", "torchscript"):
        runtime = load_runtime(open_package(tmp_path), backend, device="cpu")
        probs = runtime.predict(np.zeros((10, 3, 32, 32), np.uint8), crops_per_image=5)
        assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_batch_shape_is_checked(tiny_package):
    runtime = load_runtime(open_package(tiny_package), "onnx", device="cpu")
    with pytest.raises(ValueError, match="uint8 batch"):
        runtime.predict(np.zeros((2, 3, 31, 32), np.uint8))
    with pytest.raises(ValueError, match="5-crop"):
        runtime.predict(np.zeros((7, 3, 32, 32), np.uint8), crops_per_image=5)
    assert runtime.predict(np.zeros((0, 3, 32, 32), np.uint8)).shape == (0, 3)


def test_device_resolution_on_this_machine():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(RuntimeBackendError):
        resolve_device("tpu")


def test_cuda_request_without_gpu_is_a_clear_error(tiny_package):
    """Run in a process that sees no CUDA device (CUDA_VISIBLE_DEVICES empty hides the GPUs
    from the driver itself), so that a GPU machine checks it too."""
    code = (
        "import sys\n"
        "from sota_serve.device import resolve_device\n"
        "from sota_serve.errors import RuntimeBackendError\n"
        "from sota_serve.package.loading import open_package\n"
        "from sota_serve.runtime import load_runtime\n"
        "assert resolve_device('auto') == 'cpu'\n"
        "try:\n"
        "    load_runtime(open_package(sys.argv[1]), 'onnx', device='cuda')\n"
        "except RuntimeBackendError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    sys.exit('a runtime was opened on cuda')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_package)], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA device is visible" in out.stdout


@pytest.mark.parametrize("k", [1, 5])
def test_padded_batches_give_the_unpadded_answers_at_every_size(tiny_package, k):
    """What a CUDA runtime does (pad_batches), on the CPU: each batch of n images runs as the
    next power of two, the padding's rows dropped from the answer."""
    unpadded = load_runtime(open_package(tiny_package), "onnx", device="cpu")
    padded = load_runtime(open_package(tiny_package), "onnx", device="cpu")
    padded.pad_batches = True
    x = np.random.default_rng(k).integers(0, 256, (17 * k, 3, 32, 32), dtype=np.uint8)
    for n in range(1, 18):
        rows = x[: n * k]
        assert padded._pad(rows, k).shape[0] == (1 << (n - 1).bit_length()) * k
        np.testing.assert_allclose(padded.predict(rows, crops_per_image=k),
                                   unpadded.predict(rows, crops_per_image=k), atol=1e-6)


def test_buckets_are_powers_of_two_up_to_the_largest_batch(tiny_package):
    runtime = load_runtime(open_package(tiny_package), "onnx", device="cpu")
    assert runtime.buckets(128) == [128]  # a CPU pads nothing: one shape
    runtime.pad_batches = True
    assert runtime.buckets(1) == [1]
    assert runtime.buckets(8) == [1, 2, 4, 8]
    assert runtime.buckets(32) == [1, 2, 4, 8, 16, 32]
    assert runtime.buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert runtime.buckets(12) == [1, 2, 4, 8, 12]

    def runs_as(n: int) -> int:  # the images a batch of n runs as
        return runtime._pad(np.zeros((n, 3, 32, 32), np.uint8), 1).shape[0]

    # warming up the buckets runs every shape a batch of up to `top` images runs as
    for top in (1, 8, 12, 100, 128):
        assert {runs_as(n) for n in range(1, top + 1)} == {runs_as(b) for b in runtime.buckets(top)}


def test_cpu_session_uses_cpu_provider_only(tiny_package):
    runtime = load_runtime(open_package(tiny_package), "onnx", device="cpu")
    assert runtime.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_every_format_has_its_runtime(backend):
    from sota_serve import formats
    from sota_serve.runtime import RUNTIMES

    assert set(RUNTIMES) == set(formats.NAMES)
    runtime_class = RUNTIMES[backend]()
    assert runtime_class.backend == backend


def test_open_runtime_refuses_an_unknown_backend(tiny_package):
    from sota_serve.runtime import open_runtime

    package = open_package(tiny_package)
    with pytest.raises(RuntimeBackendError, match="unknown backend 'tflite'; use one of onnx, pt2, torchscript"):
        open_runtime("tflite", b"", package.card, device="cpu")
