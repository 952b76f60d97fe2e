import json
import re

import pytest

from sota_serve.card import ModelCard
from sota_serve.errors import CardError
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

    from sota_serve.model_readme import render_readme

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
    from sota_serve.model_readme import render_readme

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
