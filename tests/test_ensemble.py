"""Ensembles: one package whose graph averages its members, served like any model."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from bench.server import Server
from sota_serve.building.ensemble import EnsembleError, build_ensemble
from sota_serve.classifier import Classifier
from sota_serve.cli import main as cli
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from tests.helpers import card_dict, tiny_cnn


@pytest.fixture(scope="module")
def members(tmp_path_factory, photos):
    """Two tiny CNNs with different weights and different normalization stats."""
    from sota_serve.building.export import export_package

    root = tmp_path_factory.mktemp("members")
    out = []
    for seed, mean in ((0, [0.485, 0.456, 0.406]), (1, [0.5, 0.5, 0.5])):
        card = ModelCard.parse(card_dict(name=f"tiny-seed{seed}", normalization={
            "mean": mean, "std": [0.229, 0.224, 0.225], "pixel_scale": 255.0, "in_graph": True},
            metrics={"accuracy": 0.5 + seed / 10}))
        export_package(tiny_cnn(seed=seed), card, root / f"m{seed}")
        out.append(root / f"m{seed}")
    return out


def test_the_ensemble_graph_is_the_weighted_mean_of_its_members(members, photos, tmp_path, capsys):
    card = build_ensemble(members, tmp_path / "ens", weights=[3, 1])
    assert [m.weight for m in card.ensemble.members] == [0.75, 0.25]
    assert card.ensemble.members[1].normalization.mean == (0.5, 0.5, 0.5)
    assert card.export.max_abs_diff.keys() == {"onnx", "pt2", "torchscript"}
    data = [p.read_bytes() for p in photos]
    for backend in ("onnx", "pt2", "torchscript"):
        ens = Classifier.open(tmp_path / "ens", backend=backend, device="cpu")
        one = [Classifier.open(m, backend=backend, device="cpu") for m in members]
        for tta in ("none", "five_crop"):
            want = 0.75 * one[0].probabilities(data, tta) + 0.25 * one[1].probabilities(data, tta)
            got = ens.probabilities(data, tta)
            assert np.abs(got - want).max() < 1e-5, (backend, tta)
    assert open_package(tmp_path / "ens").verified
    lone = open_package(tmp_path / "ens" / "model.onnx")  # a lone file knows it is an ensemble
    assert [m.tag for m in lone.card.ensemble.members] == ["tiny-seed0:1", "tiny-seed1:1"]

    assert cli(["inspect", str(tmp_path / "ens")]) == 0
    out = capsys.readouterr().out
    assert "member 1       tiny-seed0:1, weight 0.750, accuracy 50.00% (its own card)" in out
    assert "member 2       tiny-seed1:1, weight 0.250, accuracy 60.00% (its own card)" in out


def _export(tmp_path, name, **card):
    from sota_serve.building.export import export_package

    export_package(tiny_cnn(), ModelCard.parse(card_dict(name=name, **card)), tmp_path / name, formats=("onnx",))
    return tmp_path / name


@pytest.mark.parametrize(("change", "field"), [
    ({"labels": ["cat", "dog", "fox"]}, "labels is ['cat', 'dog', 'fox'] but tiny-seed0:1 has ['cat', 'dog', 'bird']"),
    ({"input": {"height": 32, "width": 36}}, "input.width is 36"),
    ({"preprocess": {"resize_shortest_edge": 38}}, "preprocess.resize_shortest_edge is 38"),
    ({"preprocess": {"resize_shortest_edge": 36, "interpolation": "bicubic"}}, "preprocess.interpolation"),
])
def test_members_that_disagree_are_refused_naming_the_field(members, tmp_path, change, field):
    other = _export(tmp_path, "other", **change)
    with pytest.raises(EnsembleError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build_ensemble([members[0], other], tmp_path / "ens")
    assert cli(["ensemble", str(members[0]), str(other), "--out", str(tmp_path / "ens2")]) == 2


def test_an_int8_ensemble_needs_data_for_its_ranges(members, tmp_path):
    from training.ensemble import ensemble_packages

    with pytest.raises(EnsembleError, match="int8 ensemble needs --data"):
        ensemble_packages(members, tmp_path / "ens", int8=True)
    # without int8 files in the members and without data, nothing is quantized
    assert ensemble_packages(members, tmp_path / "ens2").int8 is None


def test_members_with_int8_files_give_an_int8_ensemble_when_data_is_given(members, photos, digit_files, tmp_path):
    from sota_serve.building.quantize import add_int8
    from training.ensemble import ensemble_packages

    data = tmp_path / "data"  # an image folder of the members' three classes
    for split in ("train", "val"):
        for label in ("cat", "dog", "bird"):
            (data / split / label).mkdir(parents=True)
            for p in photos:
                shutil.copy(p, data / split / label / p.name)
    quantized = []
    for m in members:
        shutil.copytree(m, tmp_path / m.name)
        add_int8(tmp_path / m.name, digit_files[:40])
        quantized.append(tmp_path / m.name)
    card = ensemble_packages(quantized, tmp_path / "ens", data=str(data))
    assert open_package(tmp_path / "ens").precisions("onnx") == ("fp32", "int8")
    assert card.int8.source == "validation" and card.int8.images == 9
    assert ensemble_packages(quantized, tmp_path / "ens-fp32", data=str(data), int8=False).int8 is None
    # one member without int8: the ensemble has none unless asked for
    assert ensemble_packages([quantized[0], members[1]], tmp_path / "mixed", data=str(data)).int8 is None


def test_bad_weights_and_single_members_are_refused(members, tmp_path):
    with pytest.raises(EnsembleError, match="one positive weight per member"):
        build_ensemble(members, tmp_path / "ens", weights=[1, 0])
    with pytest.raises(EnsembleError, match="at least 2"):
        build_ensemble(members[:1], tmp_path / "ens")
    with pytest.raises(EnsembleError, match="tiny-seed0:1 given more than once"):
        build_ensemble([members[0], members[0]], tmp_path / "ens")


@pytest.mark.slow
def test_seeds_ensemble_is_measured_served_and_at_least_the_weaker_member(small_digits_folder, tmp_path, capsys):
    """Two real fastai trainings (seeds 42 and 43) ensembled; `bentoml serve` answers with it."""
    out = tmp_path / "tiny"
    assert cli(["train", "--data", str(small_digits_folder), "--arch", "xresnet18",
                "--stages", "24:1:32:1e-2,32:1:32:5e-3", "--name", "tiny-digits", "--out", str(out),
                "--seeds", "2", "--ensemble"]) == 0
    printed = capsys.readouterr().out
    card = open_package(out).card
    members = {m.tag: m for m in card.ensemble.members}
    assert len(members) == 2 and (tmp_path / "tiny-seed42").is_dir() and (tmp_path / "tiny-seed43").is_dir()
    measured = card.metrics.members
    assert set(measured) == set(members) and card.metrics.valid_count == 36
    assert card.metrics.accuracy >= min(measured.values())
    assert card.metrics.accuracy_five_crop is not None
    assert card.parity.passed and card.parity.max_abs_diff < 1e-5 and card.parity.top1_agreement == 1.0
    assert "ensemble accuracy: plain" in printed and "2 members" in printed
    # its int8 file, as each member has one: ranges from the training images, checked on validation
    assert open_package(out).precisions("onnx") == ("fp32", "int8")
    assert card.int8.source == "validation" and card.int8.images == 36
    assert "int8 onnx: top-1 agreement" in printed
    for seed in (42, 43):  # each member is its own package, named for its seed
        assert open_package(tmp_path / f"tiny-seed{seed}").card.tag in members
    assert sorted(t.split(":")[0] for t in members) == ["tiny-digits-seed42", "tiny-digits-seed43"]

    image = next((small_digits_folder / "val" / "7").iterdir()).read_bytes()
    with Server(out, home=tmp_path / "bentoml", env={"SOTA_SERVE_DEVICE": "cpu"}) as server:
        server.wait_ready()
        for tta in ("none", "five_crop"):
            r = httpx.post(f"{server.url}/classify", files={"image": ("7.png", image, "image/png")},
                           data={"tta": tta}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["tta"] == tta and body["model"] == card.tag
            want = Classifier.open(out, device="cpu").classify([image], tta=tta, top_k=3)[0]
            assert [p["label"] for p in body["predictions"]] == [p.label for p in want.predictions]
        assert json.loads(httpx.get(f"{server.url}/card", timeout=10).text)["ensemble"]["members"]
    shutil.rmtree(tmp_path / "bentoml", ignore_errors=True)


def test_an_ensemble_is_quantized_with_each_member_s_first_and_last_layer_in_fp32(members, digit_files, photos,
                                                                                    tmp_path, capsys):
    import onnx

    from sota_serve.formats.onnx_int8 import kept_in_fp32

    build_ensemble(members, tmp_path / "ens", weights=[1, 1])
    folder = tmp_path / "calibration"
    folder.mkdir()
    for f in [*digit_files, *photos]:
        shutil.copy(f, folder / f.name)
    assert cli(["quantize", str(tmp_path / "ens"), "--calibration", str(folder)]) == 0
    assert "wrote model.int8.onnx; top-1 agreement with fp32" in capsys.readouterr().out

    package = open_package(tmp_path / "ens")  # hashed, the new file included
    card = package.card
    assert package.precisions("onnx") == ("fp32", "int8") and card.int8.images > 0
    assert len(card.ensemble.members) == 2  # the rest of the card is kept
    kept = card.export.int8_fp32_layers
    graph = onnx.load(str(tmp_path / "ens" / "model.onnx")).graph
    assert kept == kept_in_fp32(graph) and len(kept) == 4  # two per member
    assert {name.split("/")[0] for name in kept} == {"member0", "member1"}
    data = [p.read_bytes() for p in photos]
    int8 = Classifier.open(tmp_path / "ens", device="cpu", precision="int8").probabilities(data)
    full = Classifier.open(tmp_path / "ens", device="cpu", precision="fp32").probabilities(data)
    assert 0 < np.abs(int8 - full).max() < 0.1  # quantized, and close
