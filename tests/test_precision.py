"""fp16 files beside fp32: written, hashed, measured against fp32, and chosen by ``precision``.

Everything here runs on the CPU (CI has no GPU): ONNX Runtime and torch both run fp16 graphs
there, slowly, which is enough to check what the files compute. Which precision a GPU would
serve is checked on ``precision.choose`` with the device given; fp16 on a real GPU is
tests/test_gpu.py's (``make test-gpu``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from sota_serve.building.export import export_package
from sota_serve.classifier import Classifier
from sota_serve.cli import main as cli
from sota_serve.errors import ExportError, IntegrityError, PackageError, RuntimeBackendError
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package import precision
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from tests.helpers import card_dict, served_like_offline, tampered_copy, tiny_cnn


@pytest.fixture(scope="module")
def fp16_package(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("fp16-package")
    card = ModelCard.parse(card_dict())
    check = np.concatenate([Preprocessor.from_card(card)(p.read_bytes()) for p in photos])
    export_package(tiny_cnn(), card, out, check_inputs=check, fp16=True)
    return out


def test_fp16_files_are_written_beside_fp32_hashed_and_measured(fp16_package, photos):
    package = open_package(fp16_package)  # verifies all four sha256
    card = package.card
    assert set(card.artifacts) == {"onnx", "onnx-fp16", "pt2", "pt2-fp16", "torchscript", "torchscript-fp16"}
    assert card.artifacts["onnx-fp16"].path == "model.fp16.onnx"
    assert card.artifacts["torchscript-fp16"].path == "model.fp16.pt"
    assert package.backends == ("onnx", "pt2", "torchscript")
    assert package.precisions("onnx") == ("fp32", "fp16")
    assert card.export.precisions == ["fp32", "fp16"] and card.export.formats == ["onnx", "pt2", "torchscript"]
    assert set(card.export.max_abs_diff) == set(card.artifacts)
    # measured on the export check: the photos' crops plus 4 random images
    half = card.fp16
    assert half.source == "export check" and half.images == len(photos) + 4 and half.device == "cpu"
    assert set(half.top1_agreement) == {"onnx", "pt2", "torchscript"}
    assert all(0.99 <= a <= 1 for a in half.top1_agreement.values())
    assert all(0 <= d < 1e-2 for d in half.max_abs_diff.values())
    # the fp16 files really hold half-precision weights; inputs and outputs stay uint8 / fp32
    graph = onnx.load(str(fp16_package / "model.fp16.onnx")).graph
    conv_weights = [t for t in graph.initializer if len(t.dims) == 4 and not t.name.startswith("normalize.")]
    assert conv_weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in conv_weights)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    module = torch.jit.load(str(fp16_package / "model.fp16.pt"))
    assert {p.dtype for p in module.parameters()} == {torch.float16}
    # the card.json record, not the embedded card: the files' bytes do not depend on it
    assert "fp16" not in json.loads(package.card.serving_json())


@pytest.mark.parametrize("backend", ["onnx", "pt2", "torchscript"])
def test_fp16_predicts_what_fp32_does_on_real_photos(fp16_package, photos, backend):
    images = [p.read_bytes() for p in photos]
    for tta in ("none", "five_crop"):
        full = Classifier.open(fp16_package, backend=backend, device="cpu", precision="fp32")
        half = Classifier.open(fp16_package, backend=backend, device="cpu", precision="fp16")
        assert (full.runtime.precision, half.runtime.precision) == ("fp32", "fp16")
        p32, p16 = full.probabilities(images, tta), half.probabilities(images, tta)
        assert p16.dtype == np.float32 and np.isfinite(p16).all()
        np.testing.assert_allclose(p16.sum(1), 1, atol=1e-3)
        assert (p16.argmax(1) == p32.argmax(1)).all()
        assert np.abs(p16 - p32).max() < 1e-2


def test_auto_serves_fp32_on_a_cpu(fp16_package):
    clf = Classifier.open(fp16_package, device="cpu")
    assert clf.runtime.precision == "fp32"


def _card_with(agreement: float | None) -> ModelCard:
    extra = {} if agreement is None else {"fp16": {
        "images": 100, "source": "validation", "device": "cuda", "min_top1_agreement": 0.99,
        "top1_agreement": {"onnx": agreement}, "max_abs_diff": {"onnx": 0.01}}}
    return ModelCard.parse(card_dict(**extra))


@pytest.mark.parametrize(("agreement", "keys", "device", "requested", "chosen"), [
    (1.0, {"onnx", "onnx-fp16"}, "cuda", "auto", "fp16"),       # a GPU, and fp16 agrees
    (0.995, {"onnx", "onnx-fp16"}, "cuda", "auto", "fp16"),
    (0.98, {"onnx", "onnx-fp16"}, "cuda", "auto", "fp32"),      # below the bar
    (None, {"onnx", "onnx-fp16"}, "cuda", "auto", "fp32"),      # never measured
    (1.0, {"onnx", "onnx-fp16"}, "cpu", "auto", "fp32"),        # fp16 is slower on a CPU
    (1.0, {"onnx"}, "cuda", "auto", "fp32"),                    # no fp16 file
    (0.5, {"onnx", "onnx-fp16"}, "cpu", "fp16", "fp16"),        # asked for: served, whatever the bar
    (1.0, {"onnx", "onnx-fp16"}, "cuda", "fp32", "fp32"),
    (None, {"onnx-fp16"}, "cpu", "auto", "fp16"),               # a lone fp16 file serves as what it is
])
def test_choose(agreement, keys, device, requested, chosen):
    assert precision.choose(_card_with(agreement), keys, "onnx", device, requested) == chosen


def test_choose_refuses_what_is_not_there():
    card = _card_with(1.0)
    with pytest.raises(PackageError, match="no fp16 onnx artifact .* export with --fp16"):
        precision.choose(card, {"onnx", "torchscript-fp16"}, "onnx", "cuda", "fp16")
    with pytest.raises(PackageError, match="no torchscript artifact"):
        precision.choose(card, {"onnx"}, "torchscript", "cpu", "auto")
    with pytest.raises(RuntimeBackendError, match="unknown precision 'bf16'"):
        precision.choose(card, {"onnx"}, "onnx", "cpu", "bf16")


def test_keys_and_file_names():
    assert precision.artifact_key("onnx", "fp32") == "onnx"
    assert precision.split_key("torchscript-fp16") == ("torchscript", "fp16")
    assert precision.file_name("torchscript", "fp16") == "model.fp16.pt"
    for bad in ("onnx-fp32", "onnx-bf16", "torchscript-int8", "tflite", "onnx-"):
        with pytest.raises(ValueError, match="unknown artifact"):
            precision.split_key(bad)


def test_a_tampered_fp16_file_is_refused(fp16_package, tmp_path):
    with pytest.raises(IntegrityError, match="model.fp16.onnx"):
        open_package(tampered_copy(fp16_package, tmp_path, "model.fp16.onnx"))


def test_a_lone_fp16_file_serves_as_fp16(fp16_package, photos):
    package = open_package(fp16_package / "model.fp16.onnx")
    assert set(package.artifacts) == {"onnx-fp16"} and package.backends == ("onnx",)
    clf = Classifier.from_package(package, device="cpu")
    assert clf.runtime.precision == "fp16"
    assert clf.probabilities([photos[0].read_bytes()]).shape == (1, 3)


def test_fp16_that_overflows_is_refused_at_export(tmp_path):
    class Loud(nn.Module):  # fine in fp32, inf in fp16 (max 65504)
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * 1e5 + (x * 1e5).mean() * 1e-3

    with pytest.raises(ExportError, match="fp16 .* overflow; export without --fp16"):
        export_package(Loud(), ModelCard.parse(card_dict()), tmp_path, fp16=True, formats=("onnx",))


def test_cli_predict_and_inspect(fp16_package, photos, tiny_package, capsys):
    assert cli(["predict", str(fp16_package), str(photos[0]), "--precision", "fp16", "--json",
                "--device", "cpu"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert cli(["predict", str(fp16_package), str(photos[0]), "--json", "--device", "cpu"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert half[0]["predictions"][0]["label"] == full[0]["predictions"][0]["label"]
    assert cli(["inspect", str(fp16_package)]) == 0
    out = capsys.readouterr().out
    assert "onnx (fp32, fp16), pt2 (fp32, fp16), torchscript (fp32, fp16)" in out
    assert "fp16 onnx" in out and "top-1 agreement with fp32 100.00%" in out and "serves on GPU (auto)" in out
    assert "## fp16" in (fp16_package / "README.md").read_text()
    # a package without fp16 files: a clear error, exit 2
    assert cli(["predict", str(tiny_package), str(photos[0]), "--precision", "fp16"]) == 2
    assert "no fp16 onnx artifact" in capsys.readouterr().err


def test_the_store_keeps_a_formats_fp16_file(fp16_package, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    from bento.store import import_package

    model = import_package(fp16_package, name="fp16-tiny", formats=["onnx"])
    kept = open_package(model.path)
    assert set(kept.artifacts) == {"onnx", "onnx-fp16"}
    assert not any(p.suffix == ".pt" for p in kept.artifacts.values())
    only = import_package(fp16_package, name="fp16-only", formats=["onnx-fp16"])
    assert set(open_package(only.path).artifacts) == {"onnx-fp16"}


def test_server_serves_fp16_when_asked(fp16_package, photos, tmp_path):
    """A real ``bentoml serve`` with SOTA_SERVE_PRECISION=fp16 (on the CPU here): it logs the
    precision and answers what the offline fp16 classifier does."""
    served_like_offline(fp16_package, photos[0], tmp_path / "home", precision="fp16",
                        env={"SOTA_SERVE_PRECISION": "fp16"})


def test_channels_last_computes_what_nchw_does(fp16_package, photos):
    """The layout CUDA uses for TorchScript (cuDNN's NHWC kernels), checked here on the CPU."""
    from sota_serve.runtime.torchscript import TorchScriptRuntime

    package = open_package(fp16_package)
    crops = np.concatenate([Preprocessor.from_card(package.card)(p.read_bytes(), "five_crop") for p in photos])
    for key in ("torchscript", "torchscript-fp16"):
        data = package.read_artifact(key)
        nchw = TorchScriptRuntime(data, package.card, device="cpu", channels_last=False)
        nhwc = TorchScriptRuntime(data, package.card, device="cpu", channels_last=True)
        assert nhwc.channels_last and not nchw.channels_last
        assert all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in nhwc.module.parameters() if p.dim() == 4)
        np.testing.assert_allclose(nhwc.predict(crops, crops_per_image=5), nchw.predict(crops, crops_per_image=5),
                                   atol=2e-3 if key.endswith("fp16") else 1e-5)
