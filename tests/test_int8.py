"""int8 ONNX files beside fp32: quantized with ONNX Runtime, hashed, measured against fp32 on
real photos, and served on a CPU by ``precision auto`` where their agreement holds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sota_serve.building.export import export_package
from sota_serve.classifier import Classifier
from sota_serve.cli import main as cli
from sota_serve.errors import ExportError, IntegrityError
from sota_serve.formats import get as get_format
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package import precision
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from tests.helpers import card_dict, served_like_offline, tampered_copy, tiny_cnn


def _crops(card: ModelCard, photos) -> np.ndarray:
    pre = Preprocessor.from_card(card)
    return np.concatenate([pre(p.read_bytes(), tta) for p in photos for tta in ("none", "five_crop")])


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("int8-package")
    card = ModelCard.parse(card_dict())
    check = np.concatenate([Preprocessor.from_card(card)(p.read_bytes()) for p in photos])
    export_package(tiny_cnn(), card, out, check_inputs=check, int8=True, calibration=_crops(card, photos))
    return out


def test_int8_file_is_written_beside_fp32_hashed_and_measured(int8_package, photos):
    package = open_package(int8_package)  # verifies every sha256
    card = package.card
    assert set(card.artifacts) == {"onnx", "onnx-int8", "pt2", "torchscript"}
    assert card.artifacts["onnx-int8"].path == "model.int8.onnx"
    assert package.precisions("onnx") == ("fp32", "int8") and package.precisions("torchscript") == ("fp32",)
    assert card.export.precisions == ["fp32", "int8"]
    assert card.export.int8_calibration_images == 6 * len(photos)  # plain and five crops of each photo
    int8 = card.int8
    assert int8.source == "export check" and int8.images == len(photos) + 4 and int8.device == "cpu"
    assert set(int8.top1_agreement) == {"onnx"} and card.fp16 is None
    # the file is really quantized: integer weights behind DequantizeLinear, uint8 in, fp32 out
    graph = onnx.load(str(int8_package / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = {t.name: t for t in graph.initializer if len(t.dims) == 4}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in weights.values())
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # the first convolution and the classifier layer stay fp32, as the card says
    first, last = card.export.int8_fp32_layers
    nodes = {n.name: n for n in graph.node}
    assert nodes[first].op_type == "Conv" and nodes[last].op_type == "Gemm"
    assert weights[nodes[first].input[1]].data_type == onnx.TensorProto.FLOAT
    # the card.json record, not the embedded card: the files' bytes do not depend on it
    assert "int8" not in json.loads(package.card.serving_json())


def test_int8_predicts_what_fp32_does_on_real_photos(int8_package, photos):
    images = [p.read_bytes() for p in photos]
    full = Classifier.open(int8_package, device="cpu", precision="fp32")
    int8 = Classifier.open(int8_package, device="cpu", precision="int8")
    assert (full.runtime.precision, int8.runtime.precision) == ("fp32", "int8")
    for tta in ("none", "five_crop"):
        p32, p8 = full.probabilities(images, tta), int8.probabilities(images, tta)
        assert p8.dtype == np.float32 and np.isfinite(p8).all()
        np.testing.assert_allclose(p8.sum(1), 1, atol=1e-4)
        assert (p8.argmax(1) == p32.argmax(1)).all()
        assert 0 < np.abs(p8 - p32).max() < 0.05  # quantized (not the fp32 file), and close


def test_auto_serves_int8_on_a_cpu_where_it_agrees(int8_package):
    assert Classifier.open(int8_package, device="cpu").runtime.precision == "int8"
    # the TorchScript file has no int8 sibling: fp32 serves
    assert Classifier.open(int8_package, backend="torchscript", device="cpu").runtime.precision == "fp32"


def _card_with(int8: float | None, fp16: float | None = None) -> ModelCard:
    def record(agreement: float, device: str) -> dict:
        return {"images": 100, "source": "validation", "device": device, "min_top1_agreement": 0.99,
                "top1_agreement": {"onnx": agreement}, "max_abs_diff": {"onnx": 0.01}}

    extra = {} if int8 is None else {"int8": record(int8, "cpu")}
    if fp16 is not None:
        extra["fp16"] = record(fp16, "cuda")
    return ModelCard.parse(card_dict(**extra))


ALL = {"onnx", "onnx-fp16", "onnx-int8"}


@pytest.mark.parametrize(("int8", "fp16", "keys", "device", "requested", "chosen"), [
    (1.0, None, {"onnx", "onnx-int8"}, "cpu", "auto", "int8"),   # a CPU, and int8 agrees
    (0.99, 1.0, ALL, "cpu", "auto", "int8"),
    (0.98, None, {"onnx", "onnx-int8"}, "cpu", "auto", "fp32"),  # below the bar
    (None, None, {"onnx", "onnx-int8"}, "cpu", "auto", "fp32"),  # never measured
    (1.0, 1.0, ALL, "cuda", "auto", "fp16"),                    # a GPU prefers fp16
    (1.0, None, {"onnx", "onnx-int8"}, "cuda", "auto", "fp32"),  # and never picks int8
    (0.5, None, {"onnx", "onnx-int8"}, "cuda", "int8", "int8"),  # asked for: served, whatever the bar
    (1.0, None, {"onnx", "onnx-int8"}, "cpu", "fp32", "fp32"),
    (None, None, {"onnx-int8"}, "cpu", "auto", "int8"),          # a lone int8 file serves as what it is
])
def test_choose(int8, fp16, keys, device, requested, chosen):
    assert precision.choose(_card_with(int8, fp16), keys, "onnx", device, requested) == chosen


def test_int8_keys_exist_for_onnx_only():
    assert precision.split_key("onnx-int8") == ("onnx", "int8")
    assert precision.file_name("onnx", "int8") == "model.int8.onnx"
    with pytest.raises(ValueError, match="unknown artifact 'torchscript-int8'.*onnx-int8"):
        precision.split_key("torchscript-int8")


def test_int8_export_needs_calibration_images_and_an_onnx_file(tmp_path):
    card = ModelCard.parse(card_dict())
    with pytest.raises(ExportError, match="needs calibration images"):
        export_package(tiny_cnn(), card, tmp_path / "a", int8=True)
    with pytest.raises(ExportError, match="int8 is written for onnx only"):
        export_package(tiny_cnn(), card, tmp_path / "b", int8=True, formats=("torchscript",),
                       calibration=np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ExportError, match="no int8 export"):
        get_format("torchscript").quantize(tmp_path / "model.pt", [], tmp_path / "model.int8.pt")


def test_a_tampered_int8_file_is_refused(int8_package, tmp_path):
    with pytest.raises(IntegrityError, match="model.int8.onnx"):
        open_package(tampered_copy(int8_package, tmp_path, "model.int8.onnx"))


def test_cli_inspect_and_predict(int8_package, photos, capsys):
    assert cli(["inspect", str(int8_package)]) == 0
    out = capsys.readouterr().out
    assert "onnx (fp32, int8), pt2 (fp32), torchscript (fp32)" in out
    assert "int8 onnx" in out and "serves on CPU (auto)" in out
    readme = (int8_package / "README.md").read_text()
    assert "## int8" in readme and "kept in fp32" in readme
    labels = {}
    for p in ("int8", "fp32"):
        assert cli(["predict", str(int8_package), str(photos[0]), "--precision", p, "--json", "--device", "cpu"]) == 0
        labels[p] = json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"]
    assert labels["int8"] == labels["fp32"]


def test_the_store_keeps_a_formats_int8_file(int8_package, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    from bento.store import import_package

    model = import_package(int8_package, name="int8-tiny", formats=["onnx"])
    assert set(open_package(model.path).artifacts) == {"onnx", "onnx-int8"}


def test_server_serves_int8_on_a_cpu_by_default(int8_package, photos, tmp_path):
    """A real ``bentoml serve`` with no precision setting: on a CPU it serves the int8 file
    (its log says so) and answers what the offline int8 classifier does."""
    served_like_offline(int8_package, photos[0], tmp_path / "home", precision="int8", env={})


def test_quantize_adds_int8_to_an_existing_package_and_leaves_its_files_alone(tiny_package, digit_files,
                                                                               photos, tmp_path, capsys):
    """``sota-serve quantize``: for packages written before int8 (or with --no-int8)."""
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    before = {k: a.sha256 for k, a in open_package(pkg).card.artifacts.items()}
    assert "onnx-int8" not in before
    folder = tmp_path / "calibration"
    folder.mkdir()
    for f in [*digit_files, *photos]:
        shutil.copy(f, folder / f.name)
    assert cli(["quantize", str(pkg), "--calibration", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "wrote model.int8.onnx; top-1 agreement with fp32" in out

    package = open_package(pkg)  # every sha256, the new file's included
    card = package.card
    assert {k: a.sha256 for k, a in card.artifacts.items() if k in before} == before  # untouched
    assert package.precisions("onnx") == ("fp32", "int8") and card.export.precisions == ["fp32", "int8"]
    # 43 images: 21 set the ranges, the other 22 measure the agreement
    assert card.export.int8_calibration_images == 21
    assert card.int8.source == "held-out calibration" and card.int8.images == 22
    assert card.int8.device == "cpu" and set(card.int8.top1_agreement) == {"onnx"}
    assert card.ood == open_package(tiny_package).card.ood  # the rest of the card is kept
    assert "## int8" in (pkg / "README.md").read_text()
    # the embedded card is the package's serving card, as in every other file
    assert json.loads(get_format("onnx").read_card(pkg / "model.int8.onnx")) == json.loads(card.serving_json())
    int8 = Classifier.open(pkg, device="cpu", precision="int8").probabilities([photos[0].read_bytes()])
    full = Classifier.open(pkg, device="cpu", precision="fp32").probabilities([photos[0].read_bytes()])
    assert np.abs(int8 - full).max() < 0.1

    # no images: a clear error, exit 2, nothing written
    (tmp_path / "empty").mkdir()
    assert cli(["quantize", str(tiny_package), "--calibration", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert "onnx-int8" not in open_package(tiny_package).card.artifacts
