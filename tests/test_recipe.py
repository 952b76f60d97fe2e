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
