from pathlib import Path

import pytest

from training.datasets import DatasetError, open_image_folder
from training.recipe import PRESETS, RecipeError, load_recipe, parse_stages

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_files_load():
    recipe = load_recipe(path=ROOT / "recipes" / "imagenette.toml")
    assert recipe.arch == "xresnet50" and [s.size for s in recipe.stages] == [128, 224]
    assert recipe.model_dump()["stages"] == load_recipe(preset="imagenette").model_dump()["stages"]
    assert load_recipe(path=ROOT / "recipes" / "long-mixup.toml").mixup == 0.4


def test_precedence_flags_over_file_over_preset(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('arch = "xresnet34"\nseed = 7\n')
    recipe = load_recipe(preset="digits", path=f, overrides={"seed": 9, "mixup": None})
    assert recipe.arch == "xresnet34" and recipe.seed == 9 and recipe.mixup == PRESETS["digits"]["mixup"]


@pytest.mark.parametrize("bad", [{"arch": "vit"}, {"stages": []}, {"five_crop_ratios": [1.2]},
                                 {"label_smoothing": 1.5}, {"unknown_key": 1}])
def test_invalid_recipes_name_the_field(bad):
    with pytest.raises(RecipeError, match=next(iter(bad))):
        load_recipe(preset="digits", overrides=bad)


def test_stage_flag_syntax():
    assert parse_stages("128:4:64:3e-3,224:5") == [
        {"size": 128, "epochs": 4, "batch_size": 64, "lr": 3e-3}, {"size": 224, "epochs": 5}]
    with pytest.raises(RecipeError, match="size:epochs"):
        parse_stages("128")


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="train/"):
        open_image_folder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DatasetError, match="val/"):
        open_image_folder(tmp_path)
    (tmp_path / "valid" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"\['b'\]"):
        open_image_folder(tmp_path)


STAGES = [{"size": 32, "epochs": 1}]


@pytest.mark.parametrize(("data", "name"), [
    ("My Cats", "my-cats"), ("My Cats/", "my-cats"), ("photos_2024.v2", "photos_2024.v2"),
    ("--Été à Paris!!", "ete-a-paris"), ("___", "model"), ("x" * 80, "x" * 63), ("digits", "digits"),
    ("imagenette-320", "imagenette-320")])
def test_a_model_without_a_name_is_named_after_its_data(tmp_path, monkeypatch, data, name):
    """A valid BentoML tag name (lowercase, [a-z0-9._-], alphanumeric at both ends, <= 63)."""
    monkeypatch.chdir(tmp_path)
    assert load_recipe(overrides={"data": data, "stages": STAGES}).name == name
    assert load_recipe(overrides={"data": f"{tmp_path}/{data}", "stages": STAGES}).name == name


def test_a_written_name_wins_and_a_preset_keeps_its_own_on_its_own_data(tmp_path):
    folder = str(tmp_path / "Dogs")
    assert load_recipe(overrides={"data": folder, "stages": STAGES, "name": "mine"}).name == "mine"
    assert load_recipe(preset="digits").name == PRESETS["digits"]["name"]
    assert load_recipe(preset="digits", overrides={"data": folder}).name == "dogs"
    f = tmp_path / "r.toml"
    f.write_text('name = "from-file"\n')
    assert load_recipe(preset="digits", path=f, overrides={"data": folder}).name == "from-file"


def test_missing_data_folder_is_named_so(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        open_image_folder(tmp_path / "nope")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        open_image_folder(tmp_path / "file")


def test_train_with_a_missing_data_folder_says_so(tmp_path, capsys):
    from sota_serve.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--stages", "32:1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: no such folder" in err and "expected a train/" not in err
