import json
import re

import pytest

from sota_serve.errors import CardError
from sota_serve.package.card import ModelCard
from tests.helpers import card_dict


def test_round_trip_keeps_every_key_and_extensions(tmp_path):
    card = ModelCard.parse(card_dict(metrics={"accuracy": 0.9}))
    card.save(tmp_path / "card.json")
    again = ModelCard.load(tmp_path / "card.json")
    assert again == card
    assert again.to_dict()["metrics"] == {"accuracy": 0.9}
    data = json.loads((tmp_path / "card.json").read_text())
    for key in ("schema_version", "name", "version", "task", "labels", "input", "preprocess",
                "normalization", "output", "tta", "artifacts"):
        assert key in data


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"labels": []}, "labels"),
        ({"labels": ["a", "a"]}, "labels"),
        ({"normalization": {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}}, "normalization.mean"),
        ({"normalization": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}}, "normalization.std"),
        ({"preprocess": {"resize_shortest_edge": 16}}, "resize_shortest_edge"),
        ({"preprocess": {"resize_shortest_edge": 36, "interpolation": "magic"}}, "preprocess.interpolation"),
        ({"tta": {"default": "five_crop"}}, "tta"),
        ({"tta": {"five_crop": {"resize_shortest_edge": 8}}}, "five_crop"),
        ({"input": {"height": 32, "width": 32, "dtype": "float32"}}, "input.dtype"),
        ({"output": "embeddings"}, "output"),
        ({"artifacts": {"onnx": {"path": "../evil.onnx", "sha256": "0" * 64}}}, "artifacts.onnx.path"),
        ({"artifacts": {"onnx": {"path": "model.onnx", "sha256": "xyz"}}}, "artifacts.onnx.sha256"),
    ],
)
def test_invalid_cards_are_refused_naming_the_field(change, field):
    with pytest.raises(CardError, match=field.split(".")[-1]):
        ModelCard.parse(card_dict(**change))


def test_missing_required_key_is_named():
    data = card_dict()
    del data["normalization"]
    with pytest.raises(CardError, match="normalization"):
        ModelCard.parse(data)


def test_not_json():
    with pytest.raises(CardError, match="not valid JSON"):
        ModelCard.parse("{nope")


def test_embedded_copy_has_no_artifacts():
    card = ModelCard.parse(card_dict(artifacts={"onnx": {"path": "model.onnx", "sha256": "a" * 64}}))
    assert "artifacts" not in card.to_dict(with_artifacts=False)


def test_package_readme_has_hugging_face_front_matter_usage_and_reproduction():
    import yaml

    from sota_serve.building.model_readme import render_readme

    data = card_dict()
    data["metrics"] = {"accuracy": 0.9, "accuracy_five_crop": 0.92, "valid_count": 10,
                       "five_crop_resize": 37, "five_crop_by_resize": {"37": 0.92, "40": 0.91}}
    data["training"] = {"recipe": {"name": "r", "seed": 7}, "device": "cpu", "seconds": 3.0,
                        "versions": {"fastai": "2.8"},
                        "dataset": {"name": "digits", "train": 20, "valid": 10, "classes": 3}}
    text = render_readme(ModelCard.parse(data))
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["pipeline_tag"] == "image-classification" and front["datasets"] == ["digits"]
    values = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert values == {"accuracy (center crop)": 0.9, "accuracy (five-crop TTA)": 0.92}
    assert "## Usage" in text and "## How to reproduce" in text and '"seed": 7' in text
    assert "slightly optimistic" in text  # the five-crop edge was picked on the validation set


def test_tta_policies_in_the_card_and_its_readme():
    from sota_serve.building.model_readme import render_readme

    card = ModelCard.parse(card_dict())
    assert card.tta.policies() == ("none", "flip", "five_crop", "ten_crop")
    data = card_dict()
    data["metrics"] = {"accuracy": 0.9, "accuracy_ten_crop": 0.95, "valid_count": 10, "tta": {
        "default": "ten_crop", "held_out_images": 5, "selection": "rule",
        "policies": {"none": {"accuracy": 0.9, "accuracy_held_out": 0.8, "model_calls_per_image": 1},
                     "ten_crop": {"accuracy": 0.95, "accuracy_held_out": 1.0, "model_calls_per_image": 10,
                                  "resize_shortest_edge": 40,
                                  "held_out_vs_none": {"gain": 0.2, "wins": 1, "losses": 0,
                                                       "significant": False}}}}}
    text = render_readme(ModelCard.parse(data))
    assert "| ten-crop TTA | 10 | 40 | 95.00% | 100.00% | +20.00 pts (1 won, 0 lost; within noise) |" in text
    assert "`ten_crop`: resize the shortest edge to 40 px, take the five crops, then the five crops" in text


@pytest.mark.parametrize("tta, message", [
    ({"default": "flip"}, "tta.default is 'flip' but tta.flip is not set"),
    ({"ten_crop": {"resize_shortest_edge": 20}}, "tta.ten_crop.resize_shortest_edge (20) is smaller"),
    ({"default": "six_crop"}, "tta.default"),
])
def test_bad_tta_sections_name_the_field(tta, message):
    with pytest.raises(CardError, match=re.escape(message)):
        ModelCard.parse(card_dict(tta=tta))


# --- typed sections ----------------------------------------------------------------------

def _full_card_dict() -> dict:
    """Every section sota-serve writes, as training writes it (plus keys a newer version might add)."""
    return card_dict(
        architecture="xresnet18",
        intended_use="digits", limitations="only digits", license="cc-by-4.0",
        source={"kind": "fastai-learner", "file": "export.pkl"},
        metrics={"accuracy": 0.98, "accuracy_fastai_pipeline": 0.98, "accuracy_flip": 0.95,
                 "accuracy_five_crop": 0.99, "accuracy_ten_crop": 0.97, "accuracy_fastai_tta": 0.985,
                 "valid_loss": 0.6, "valid_count": 360, "train_count": 1437, "image_size": 32,
                 "five_crop_resize": 40, "five_crop_by_resize": {"40": 0.99, "44": 0.97},
                 "tta": {"policies": {
                     "none": {"accuracy": 0.98, "accuracy_held_out": 0.99, "model_calls_per_image": 1},
                     "five_crop": {"accuracy": 0.99, "accuracy_held_out": 0.98, "model_calls_per_image": 5,
                                   "resize_shortest_edge": 40,
                                   "held_out_vs_none": {"gain": 0.0, "wins": 1, "losses": 1, "significant": False},
                                   "tune_accuracy_by_resize": {"40": 0.99}}},
                     "default": "none", "tune_images": 180, "held_out_images": 180, "selection": "rule"},
                 "calibration_error": 0.03},
        parity={"images": 360, "backend": "onnx", "reference": "fastai", "top1_agreement": 1.0,
                "max_abs_diff": 9.2e-07, "passed": True},
        export={"formats": ["onnx", "torchscript"], "onnx_opset": 17, "check_images": 20,
                "max_abs_diff": {"onnx": 8.9e-07, "torchscript": 0.0}, "tolerance": 0.0001,
                "torch": "2.14.1", "onnx": "1.23.2"},
        training={"recipe": {"name": "r", "arch": "xresnet18", "seed": 42, "mixup": None},
                  "history": [{"epoch": 1, "stage": 1, "size": 24, "train_loss": 1.6, "valid_loss": 4.9,
                               "accuracy": 0.4, "seconds": 20.0, "lr": 0.01}],
                  "seconds": 149.9, "device": "cpu", "versions": {"fastai": "2.8.12"},
                  "dataset": {"name": "digits", "classes": 10, "train": 1437, "valid": 360,
                              "fingerprint": "ab" * 32}},
        figures={"training_curve": "training_curve.png"},
    )


def test_every_section_round_trips_through_its_model():
    from sota_serve.package.card import ExportRecord, Metrics, Parity, TrainingRecord

    data = _full_card_dict()
    card = ModelCard.parse(data)
    assert card.to_dict() == {**data, "artifacts": {}}  # every key: unknown ones (calibration_error, lr), nulls in the recipe
    assert ModelCard.parse(card.to_json()) == card
    sections = {"metrics": Metrics, "parity": Parity, "export": ExportRecord, "training": TrainingRecord}
    for key, model in sections.items():
        section = getattr(card, key)
        assert isinstance(section, model), key
        assert section.model_dump(mode="json", exclude_none=True) == data[key], key
    assert card.metrics.headline() == {"accuracy": 0.98, "accuracy_five_crop": 0.99, "accuracy_fastai_tta": 0.985}
    assert [n for _, n, _ in card.metrics.accuracies()] == ["plain", "flip", "five-crop", "ten-crop", "fastai TTA"]
    assert card.metrics.policy("five_crop").held_out_vs_none.wins == 1
    assert card.training.history[0].accuracy == 0.4 and card.training.seed == 42
    assert card.arch == "xresnet18" and card.parity.top1_agreement == 1.0


def test_absent_sections_are_left_out_not_null():
    data = ModelCard.parse(card_dict()).to_dict()
    for key in ("metrics", "parity", "export", "training", "figures", "ood", "license", "architecture"):
        assert key not in data


@pytest.mark.parametrize(("section", "value", "field"), [
    ("parity", {"images": 10, "top1_agreement": 1.5, "max_abs_diff": 0.0}, "parity.top1_agreement"),
    ("parity", {"images": 10, "max_abs_diff": 0.0}, "parity.top1_agreement"),
    ("metrics", {"accuracy": "high"}, "metrics.accuracy"),
    ("export", {"formats": []}, "export.formats"),
    ("training", {"history": [{"stage": 1}]}, "training.history.0.epoch"),
    ("artifacts", {"safetensors": {"path": "m.st", "sha256": "0" * 64}}, "unknown artifact 'safetensors'"),
        ("artifacts", {"torchscript-int8": {"path": "m.pt", "sha256": "0" * 64}}, "onnx-fp16"),
        ("fp16", {"images": 3, "source": "validation", "device": "cpu"}, "fp16.min_top1_agreement"),
])
def test_bad_sections_are_refused_naming_the_field(section, value, field):
    with pytest.raises(CardError, match=re.escape(field)):
        ModelCard.parse(card_dict(**{section: value}))


def test_serving_part_leaves_out_the_records():
    card = ModelCard.parse(_full_card_dict())
    serving = json.loads(card.serving_json())
    assert not {"artifacts", "metrics", "parity", "export", "training", "figures"} & set(serving)
    for key in ("labels", "input", "preprocess", "normalization", "tta", "intended_use", "license", "source"):
        assert serving[key] == card.to_dict()[key]
    assert ModelCard.parse(serving).labels == card.labels


def test_classifier_card_factory():
    from sota_serve.package.card import classifier_card

    card = classifier_card(name="m", labels=[0, 1], size=32, resize_edge=36, mean=(0.5,) * 3,
                           std=(0.25,) * 3, architecture="tiny")
    assert card.labels == ["0", "1"] and card.input.dtype == "uint8" and card.normalization.in_graph
    assert card.tta.edges() == {"flip": 36, "five_crop": 37, "ten_crop": 37}  # round(32 / 0.875)
    assert card.arch == "tiny" and card.tta.default == "none"
    with pytest.raises(CardError, match="resize_shortest_edge"):
        classifier_card(name="m", labels=["a"], size=32, resize_edge=16, mean=(0.5,) * 3, std=(0.2,) * 3)


def test_the_card_names_the_tta_policies_of_sota_serve_tta():
    """The card's schema spells the policies out as fields; they must be the tta module's."""
    from typing import get_args

    from sota_serve.package.card import ACCURACY_NAMES, Metrics, TTASpec, accuracy_key
    from sota_serve.tta import LABELS, POLICIES, TTA

    assert get_args(TTA) == POLICIES
    assert tuple(f for f in TTASpec.model_fields if f != "default") == POLICIES[1:]
    assert all(accuracy_key(p) in Metrics.model_fields for p in POLICIES)
    assert ACCURACY_NAMES[:len(POLICIES)] == tuple((accuracy_key(p), LABELS[p]) for p in POLICIES)
    assert ACCURACY_NAMES[2] == ("accuracy_five_crop", "five-crop")
