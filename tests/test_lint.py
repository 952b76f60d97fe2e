"""House rules that a reader can check: ruff (with a complexity limit) and the import direction."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    out = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", "sota_serve", "training", "bento",
                          "bench", "dev", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_neither_training_nor_bento():
    for path in (ROOT / "sota_serve").rglob("*.py"):
        text = path.read_text()
        for banned in ("import training", "from training", "import bento", "from bento", "import fastai",
                       "from fastai", "import bench", "from bench"):
            assert banned not in text, f"{path.relative_to(ROOT)} has {banned!r}"


def test_one_definition_of_the_imagenet_stats():
    sources = [p for d in ("sota_serve", "training", "bento", "bench") for p in (ROOT / d).rglob("*.py")]
    hits = [p for p in sources if "0.485, 0.456, 0.406" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in hits] == ["sota_serve/constants.py"]


def test_training_and_bento_meet_only_in_the_core():
    """training -> sota_serve <- bento, nothing between the two rooms."""
    rooms = {"training": ("bento", "bench"), "bento": ("training", "bench")}
    for room, banned_rooms in rooms.items():
        for path in (ROOT / room).rglob("*.py"):
            text = path.read_text()
            for other in banned_rooms:
                for banned in (f"import {other}", f"from {other}"):
                    assert banned not in text, f"{path.relative_to(ROOT)} has {banned!r}"


def test_bentofiles_take_their_packages_from_pyproject():
    import tomllib

    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the serve extra's runtime packages; bentoml is the Bento's own, uv only builds it
    serving = {d for d in project["optional-dependencies"]["serve"]
               if re.split(r"[<>=!~;\[ ]", d)[0] not in ("bentoml", "uv")}
    core = set(project["dependencies"]) | serving
    assert any(d.startswith("uvloop") for d in serving), "the serve extra brings uvicorn's C loop"
    onnx = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    assert set(onnx) == core, "bentofile.yaml must list pyproject's core dependencies and the serve"\
                              " extra's runtime packages"
    torchscript = set(yaml.safe_load((ROOT / "bentofile.torchscript.yaml").read_text())["python"]["packages"])
    extra = set(project["optional-dependencies"]["torchscript"])
    assert core <= torchscript <= core | extra and torchscript & extra
