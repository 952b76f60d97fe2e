import numpy as np
import pytest

from sota_serve.device import resolve_device
from sota_serve.errors import RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from sota_serve.runtime import load_runtime
from tests.helpers import card_dict, tiny_cnn


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
    if resolve_device("auto") == "cuda":
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(RuntimeBackendError, match="no CUDA device"):
        load_runtime(open_package(tiny_package), "onnx", device="cuda")


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
