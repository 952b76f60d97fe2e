"""The torch.export format (model.pt2) and the exporters off the TorchScript tracer: a real
package's archive, its embedded card, its sha256, its check against pickled entries, its
parity with ONNX on real photos, and no torch.jit deprecation notice from sota-serve's own
export path."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sota_serve.building.export import export_package
from sota_serve.classifier import Classifier
from sota_serve.cli import main
from sota_serve.errors import PackageError
from sota_serve.formats import get as get_format
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package, sha256_file
from sota_serve.runtime import load_runtime
from tests.helpers import LABELS, card_dict, tiny_cnn

JIT_NOTICE = re.compile(r"`torch\.jit\.\w+` is (deprecated|not supported)")


def test_the_package_carries_model_pt2_hashed_with_its_card_inside(tiny_package):
    card = open_package(tiny_package).card
    assert card.artifacts["pt2"].path == "model.pt2"
    assert card.artifacts["pt2"].sha256 == sha256_file(tiny_package / "model.pt2")
    extra = {"card.json": ""}
    torch.export.load(str(tiny_package / "model.pt2"), extra_files=extra)
    assert json.loads(extra["card.json"]) == json.loads(card.serving_json())
    assert card.export.max_abs_diff["pt2"] < 1e-4


def test_inspect_and_predict_a_lone_pt2_file(tiny_package, photos, tmp_path, capsys):
    lone = tmp_path / "m.pt2"
    shutil.copy(tiny_package / "model.pt2", lone)
    assert main(["inspect", str(lone), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == LABELS
    assert main(["predict", str(lone), *map(str, photos), "--backend", "pt2", "--json", "--device", "cpu"]) == 0
    lone_top = [r["predictions"][0]["label"] for r in json.loads(capsys.readouterr().out)]
    onnx = Classifier.open(tiny_package, backend="onnx", device="cpu", precision="fp32")
    assert lone_top == [r.predictions[0].label for r in onnx.classify([p.read_bytes() for p in photos])]


def test_pt2_gives_the_onnx_probabilities_at_every_batch_size(tiny_package, photos):
    package = open_package(tiny_package)
    pt2 = load_runtime(package, "pt2", device="cpu", precision="fp32")
    onnx = load_runtime(package, "onnx", device="cpu", precision="fp32")
    x = np.random.default_rng(3).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    for n in (1, 2, 7):  # the batch dimension is dynamic: not only the example's 2
        np.testing.assert_allclose(pt2.predict(x[:n]), onnx.predict(x[:n]), atol=1e-5)
    images = [p.read_bytes() for p in photos]
    for tta in ("none", "five_crop"):
        a = Classifier.from_package(package, backend="pt2", device="cpu").probabilities(images, tta)
        b = Classifier.from_package(package, backend="onnx", device="cpu", precision="fp32").probabilities(images, tta)
        assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 1e-4


def _rewritten(source: Path, into: Path, change) -> Path:
    """A copy of the archive ``source`` with each entry's bytes passed through ``change(name, data)``."""
    out = io.BytesIO()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, change(item.filename, zin.read(item.filename)))
    into.write_bytes(out.getvalue())
    return into


def test_an_archive_with_pickled_weights_is_refused_before_torch_export_load(tiny_package, tmp_path):
    def pickled(name: str, data: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return data
        config = json.loads(data)
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True
        return json.dumps(config).encode()

    bad = _rewritten(tiny_package / "model.pt2", tmp_path / "bad.pt2", pickled)
    with pytest.raises(PackageError, match="pickled or as a custom object"):
        get_format("pt2").check(bad.read_bytes(), source=str(bad))
    with pytest.raises(PackageError, match="pickled"):
        load_runtime(open_package(bad), "pt2", device="cpu")  # a lone file: checked when read
    get_format("pt2").check((tiny_package / "model.pt2").read_bytes(), source="model.pt2")  # the real one passes


def test_an_archive_with_sample_inputs_or_foreign_entries_is_refused(tmp_path):
    card = ModelCard.parse(card_dict())
    from sota_serve.building.export import ServingModule

    module = ServingModule(tiny_cnn(), card).eval()
    program = torch.export.export(module, (torch.zeros((2, 3, 32, 32), dtype=torch.uint8),))
    with_inputs = tmp_path / "with-inputs.pt2"
    torch.export.save(program, str(with_inputs))  # torch keeps the example inputs, pickled
    with pytest.raises(PackageError, match="pickled sample inputs"):
        get_format("pt2").check(with_inputs.read_bytes(), source=str(with_inputs))
    foreign = _rewritten(with_inputs, tmp_path / "foreign.pt2",
                         lambda name, data: b"" if "sample_inputs" in name else data)
    with zipfile.ZipFile(foreign, "a") as z:
        z.writestr("with-inputs/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(PackageError, match="does not write"):
        get_format("pt2").check(foreign.read_bytes(), source=str(foreign))


def _pickling(name: str, data: bytes) -> bytes:
    """The weights config of a real archive, rewritten to ask torch to unpickle a weight."""
    if not name.endswith("_weights_config.json"):
        return data
    config = json.loads(data)
    config["config"][next(iter(config["config"]))]["use_pickle"] = True
    return json.dumps(config).encode()


def _crafted(entries: list[tuple[str, bytes]], into: Path) -> Path:
    """A zip of ``entries`` in this order, names repeated as given (zipfile warns, and writes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": what is being crafted
        for name, data in entries:
            z.writestr(name, data)
    into.write_bytes(out.getvalue())
    return into


@pytest.mark.parametrize("layout", ["duplicate-entry", "second-root", "top-level-entry"])
def test_an_archive_that_zipfile_and_torch_could_read_differently_is_refused(tiny_package, tmp_path, layout):
    """A pickling weights config first, where torch's reader looks, and a clean copy where
    Python's zipfile looks: the last of two entries of one name, or the same entries under a
    second root folder after the first. Neither passes; nor does an entry outside any folder."""
    with zipfile.ZipFile(tiny_package / "model.pt2") as z:
        real = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    root = real[0][0].partition("/")[0]
    assert all(name.startswith(f"{root}/") for name, _ in real)
    bad = [(name, _pickling(name, data)) for name, data in real]
    config = next(name for name, _ in real if name.endswith("_weights_config.json"))
    extra = {"duplicate-entry": [(config, dict(real)[config])],
             "second-root": [(f"decoy/{name.partition('/')[2]}", data) for name, data in real],
             "top-level-entry": [("model.so", b"\x7fELF")]}[layout]
    crafted = _crafted(bad + extra, tmp_path / "crafted.pt2")
    message = re.escape({"duplicate-entry": f"{config!r}); a zip reader may read either copy",
                         "second-root": f"outside one root folder (roots: {root!r}, 'decoy');",
                         "top-level-entry": "outside one root folder"}[layout])
    with pytest.raises(PackageError, match=message) as e:
        get_format("pt2").check(crafted.read_bytes(), source=str(crafted))
    assert "torch.export.save or `sota-serve export`" in str(e.value)
    with pytest.raises(PackageError, match="outside one root folder|more than once"):
        load_runtime(open_package(crafted), "pt2", device="cpu")  # a lone file: refused when its card is read
    if layout != "top-level-entry":  # the first entries alone are refused for what they are
        alone = _crafted(bad, tmp_path / "alone.pt2")
        with pytest.raises(PackageError, match="pickled or as a custom object"):
            get_format("pt2").check(alone.read_bytes(), source=str(alone))
    clean = _crafted(real, tmp_path / "clean.pt2")  # rewritten entry by entry, the archive still loads
    get_format("pt2").check(clean.read_bytes(), source=str(clean))


def test_export_raises_no_torch_jit_deprecation_and_uses_the_torch_export_onnx_exporter(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = export_package(tiny_cnn(seed=5), ModelCard.parse(card_dict()), tmp_path / "p")
    jit = [str(w.message) for w in caught if JIT_NOTICE.search(str(w.message))]
    legacy = [str(w.message) for w in caught if "legacy TorchScript-based ONNX" in str(w.message)]
    assert not jit and not legacy, jit + legacy
    assert card.export.onnx_exporter == "dynamo" and card.export.onnx_opset == 18
    assert {"onnx", "pt2", "torchscript"} <= set(card.artifacts)


def test_loading_torchscript_logs_one_line_naming_pt2_and_no_warning(tiny_package, caplog):
    from sota_serve import runtime
    from sota_serve.formats.torchscript import TORCHSCRIPT

    runtime._noted.clear()  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="sota_serve.runtime"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            load_runtime(open_package(tiny_package), "torchscript", device="cpu")
    notes = [r.getMessage() for r in caplog.records if r.name == "sota_serve.runtime"]
    assert notes == [TORCHSCRIPT.deprecated] and "pt2" in notes[0]
    assert not [w for w in caught if JIT_NOTICE.search(str(w.message))]


@pytest.mark.slow
def test_bentoml_serve_with_backend_pt2_answers_as_offline(tiny_package, photos, tmp_path):
    from tests.helpers import served_like_offline

    served_like_offline(tiny_package, photos[0], tmp_path / "home", precision="fp32",
                        env={"SOTA_SERVE_BACKEND": "pt2", "SOTA_SERVE_PRECISION": "fp32"})
