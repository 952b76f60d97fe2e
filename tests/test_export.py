"""Export: eager, ONNX and TorchScript agree; normalization in the graph is fastai's."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from sota_serve.building.export import Normalize, ServingModule, export_package
from sota_serve.errors import ExportError, IntegrityError, PackageError
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from sota_serve.runtime import load_runtime
from tests.helpers import card_dict, encode, gradient_image, tampered_copy, tiny_cnn


def _inputs(card, photos):
    pre = Preprocessor.from_card(card)
    real = [pre(p.read_bytes()) for p in photos] + [pre(p.read_bytes(), "five_crop") for p in photos]
    synthetic = [pre(encode(gradient_image(w, h))) for w, h in [(50, 90), (200, 40)]]
    noise = np.random.default_rng(1).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    return np.concatenate([*real, *synthetic, noise])


def test_onnx_pt2_torchscript_eager_agree(tiny_package, photos):
    package = open_package(tiny_package)
    card = package.card
    x = _inputs(card, photos)
    eager = ServingModule(tiny_cnn(), card).eval()
    with torch.no_grad():
        expected = eager(torch.from_numpy(x)).numpy()
    for backend in ("onnx", "pt2", "torchscript"):
        got = load_runtime(package, backend, device="cpu").predict(x)
        assert np.abs(got - expected).max() < 1e-4, backend
        assert (got.argmax(1) == expected.argmax(1)).all()
    recorded = card.to_dict()["export"]["max_abs_diff"]
    assert set(recorded) == {"onnx", "pt2", "torchscript"} and max(recorded.values()) < 1e-4


def test_normalization_in_graph_equals_fastai_normalize(photos):
    from fastai.data.transforms import IntToFloatTensor
    from fastai.data.transforms import Normalize as FastaiNormalize
    from fastai.torch_core import TensorImage
    from fastai.vision.core import imagenet_stats

    card = ModelCard.parse(card_dict())
    x = _inputs(card, photos)
    ours = Normalize(*imagenet_stats, pixel_scale=255.0)(torch.from_numpy(x))
    batch = IntToFloatTensor()(TensorImage(torch.from_numpy(x)))
    fastai = FastaiNormalize.from_stats(*imagenet_stats, cuda=False)(batch)
    assert torch.allclose(ours, fastai.as_subclass(torch.Tensor), atol=1e-6)

    # ...and the exported graph does the same: an identity "classifier" exposes it.
    class Flat(torch.nn.Module):
        def forward(self, t):
            return t.flatten(1)

    path = "/tmp/_sota_norm.onnx"
    torch.onnx.export(ServingModule(Flat(), card.model_copy(update={"output": "logits"})),
                      (torch.from_numpy(x[:2]),), path, input_names=["pixels"], dynamo=False,
                      dynamic_axes={"pixels": {0: "b"}}, opset_version=17)
    import onnxruntime as ort

    graph_out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    assert np.abs(graph_out - fastai.flatten(1).numpy()).max() < 1e-5


def test_graph_takes_uint8_and_embeds_card(tiny_package):
    model = onnx.load(str(tiny_package / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # dynamic batch
    meta = {p.key: p.value for p in model.metadata_props}
    embedded = json.loads(meta["sota_serve.card"])
    assert embedded["labels"] == ["cat", "dog", "bird"] and "artifacts" not in embedded


def test_tampered_artifact_is_refused(tiny_package, tmp_path):
    with pytest.raises(IntegrityError, match="does not match"):
        open_package(tampered_copy(tiny_package, tmp_path, "model.onnx"))


def test_swapped_after_open_is_refused_at_load(tiny_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy)
    package = open_package(copy)
    (copy / "model.pt").write_bytes(b"not the model")
    with pytest.raises(IntegrityError):
        load_runtime(package, "torchscript", device="cpu")


def test_missing_artifact_and_missing_card(tiny_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy)
    (copy / "model.pt").unlink()
    with pytest.raises(PackageError, match="missing"):
        open_package(copy)
    (copy / "card.json").unlink()
    with pytest.raises(PackageError, match="card.json"):
        open_package(copy)


def test_lone_files_carry_their_card(tiny_package, tmp_path):
    for name in ("model.onnx", "model.pt"):
        lone = tmp_path / name
        shutil.copy(tiny_package / name, lone)
        package = open_package(lone)
        assert package.card.labels == ["cat", "dog", "bird"]
        assert not package.verified
        probs = load_runtime(package, package.backends[0], device="cpu").predict(
            np.zeros((2, 3, 32, 32), np.uint8))
        assert probs.shape == (2, 3)


def test_external_data_is_refused(tiny_package, tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(tiny_package / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin",
                                   size_threshold=0)
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(PackageError, match="external file"):
        load_runtime(open_package(tmp_path / "model.onnx"), "onnx", device="cpu")


def test_export_refuses_disagreeing_model(tmp_path):
    class Unstable(torch.nn.Module):
        """Traces to a constant: the exported files cannot match the eager model."""

        def forward(self, x):
            n = int(x.abs().sum().item()) % 3
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), n), 3).float() * 10

    with pytest.raises(ExportError, match="disagrees"):
        export_package(Unstable(), ModelCard.parse(card_dict()), tmp_path, formats=("torchscript",))


def test_onnx_serving_imports_no_torch(tiny_package, photos):
    code = (
        "import sys\n"
        "from sota_serve.classifier import Classifier\n"
        f"c = Classifier.open({str(tiny_package)!r}, device='cpu')\n"
        f"c.classify([open({str(photos[0])!r}, 'rb').read()], tta='five_crop')\n"
        "from sota_serve.serving.settings import Settings\n"
        "assert Settings().decoder('cpu') == 'pillow'\n"
        "bad = [m for m in ('torch', 'fastai', 'bentoml') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_package_is_moved_into_place_whole_or_not_at_all(tmp_path):
    """training.staging: what a run writes appears at ``out`` when the run completes; a run
    stopped part-way (Ctrl-C, an error) leaves ``out`` as it was and nothing beside it."""
    from training.staging import DestinationError, staged

    out = tmp_path / "packages" / "pkg"
    with pytest.raises(KeyboardInterrupt), staged(out) as staging:
        assert staging.parent == out.parent and staging.name.startswith(".pkg.")
        (staging / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(out.parent.iterdir()) == []

    with staged(out) as staging:
        (staging / "model.onnx").write_bytes(b"new model")
        (staging / "card.json").write_text("{}")
    assert sorted(p.name for p in out.parent.iterdir()) == ["pkg"]
    assert (out / "model.onnx").read_bytes() == b"new model"

    (out / "notes.txt").write_text("mine")  # an existing package: its own files replaced, others kept
    with pytest.raises(ValueError), staged(out) as staging:
        (staging / "model.onnx").write_bytes(b"half")
        raise ValueError("an error part-way")
    assert (out / "model.onnx").read_bytes() == b"new model"
    with staged(out) as staging:
        (staging / "model.onnx").write_bytes(b"newer model")
        (staging / "card.json").write_text('{"v": 2}')
    assert sorted(p.name for p in out.parent.iterdir()) == ["pkg"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        "model.onnx": b"newer model", "card.json": b'{"v": 2}', "notes.txt": b"mine"}

    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="not a folder"), staged(tmp_path / "file"):
        pass


def test_the_exporters_chatter_is_hidden_during_an_export_only(caplog):
    """training.quiet: INFO and WARNING records and warnings of torch.onnx, onnxscript and
    onnx_ir are dropped within quiet_export; ERROR records still show, and afterwards all do."""
    import logging
    import warnings

    from training.quiet import EXPORT_LOGGERS, quiet_export

    caplog.set_level(logging.INFO)
    before = [logging.getLogger(n).level for n in EXPORT_LOGGERS]
    chatty = logging.getLogger("onnx_ir.passes.common.unused_removal")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # where quiet_export is not, every warning shows
        with quiet_export():
            chatty.info("Removed 200 unused nodes")
            logging.getLogger("onnxscript.optimizer").warning("Skipping constant folding")
            logging.getLogger("torch.onnx._internal.exporter").info("Obtain model graph")
            exec(compile("import warnings; warnings.warn('a pass warns')", "onnxscript/x.py", "exec"),
                 {"__name__": "onnxscript.rewriter"})
            logging.getLogger("onnxscript").error("a real error")
            logging.getLogger("sota_serve.training").info("our own line")
            warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("onnxscript", "a real error"), ("sota_serve.training", "our own line")]
    assert [str(w.message) for w in shown] == ["a warning of our own"]
    assert [logging.getLogger(n).level for n in EXPORT_LOGGERS] == before
    chatty.info("Removed 3 unused nodes")
    assert caplog.records[-1].getMessage() == "Removed 3 unused nodes"
