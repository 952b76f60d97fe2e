import json
import shutil
import subprocess
import sys

import pytest

from sota_serve.cli import main


def test_inspect_lone_onnx_shows_labels_stats_preprocessing(tiny_package, tmp_path, capsys):
    lone = tmp_path / "copied.onnx"
    shutil.copy(tiny_package / "model.onnx", lone)
    assert main(["inspect", str(lone)]) == 0
    out = capsys.readouterr().out
    assert "cat, dog, bird" in out
    assert "mean=[0.485, 0.456, 0.406]" in out and "std=[0.229, 0.224, 0.225]" in out
    assert "resize shortest edge 36" in out and "center crop 32x32" in out
    assert "lone file" in out


def test_inspect_lone_torchscript_json(tiny_package, tmp_path, capsys):
    lone = tmp_path / "m.pt"
    shutil.copy(tiny_package / "model.pt", lone)
    assert main(["inspect", str(lone), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["labels"] == ["cat", "dog", "bird"] and card["normalization"]["std"] == [0.229, 0.224, 0.225]


def test_predict_same_top1_with_every_backend(tiny_package, photos, capsys):
    tops = {}
    for backend in ("onnx", "pt2", "torchscript"):
        for tta in ("none", "five_crop"):
            assert main(["predict", str(tiny_package), *map(str, photos), "--backend", backend,
                         "--tta", tta, "--json", "--device", "cpu"]) == 0
            results = json.loads(capsys.readouterr().out)
            tops[backend, tta] = [r["predictions"][0]["label"] for r in results]
            scores = [p["score"] for p in results[0]["predictions"]]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    for backend in ("pt2", "torchscript"):
        assert tops["onnx", "none"] == tops[backend, "none"]
        assert tops["onnx", "five_crop"] == tops[backend, "five_crop"]


def test_predict_readable_output_and_bad_image(tiny_package, photos, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert main(["predict", str(tiny_package), str(photos[0]), str(bad), "--top-k", "2"]) == 1
    out = capsys.readouterr().out
    assert str(photos[0]) in out and "error:" in out
    assert len([line for line in out.splitlines() if line.startswith("  0.")]) == 2


@pytest.mark.parametrize("args", [["inspect", "/nonexistent"], ["predict", "/nonexistent", "x.jpg"],
                                  ["explain", "/nonexistent", "x.jpg"]])
def test_errors_exit_2_with_message(args, capsys):
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "sota_serve.cli", "--help"], capture_output=True, text=True)
    for command in ("inspect", "predict", "explain", "quantize", "train", "demo", "export", "import", "bench"):
        assert command in out.stdout


def test_predict_and_inspect_take_a_model_store_tag(tiny_package, photos, tmp_path, monkeypatch, capsys):
    # BentoML's on-disk store layout, as `sota-serve import` leaves it
    version_dir = tmp_path / "models" / "tiny-test" / "v1abc"
    shutil.copytree(tiny_package, version_dir)
    (tmp_path / "models" / "tiny-test" / "latest").write_text("v1abc")
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    assert main(["predict", str(tiny_package), str(photos[0]), "--json", "--device", "cpu"]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    for tag in ("tiny-test", "tiny-test:latest", "tiny-test:v1abc"):
        assert main(["predict", tag, str(photos[0]), "--json", "--device", "cpu"]) == 0
        assert json.loads(capsys.readouterr().out) == by_dir
    assert main(["inspect", "tiny-test:v1abc"]) == 0 and "tiny-cnn" in capsys.readouterr().out
    assert main(["inspect", "tiny-test:nope"]) == 2 and "model-store tag" in capsys.readouterr().err


def test_no_arguments_print_the_commands_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "sota_serve.cli"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    for command in ("inspect", "predict", "explain", "quantize", "import", "bench"):
        assert f"\n    {command} " in out.stderr, out.stderr
    assert out.stderr.startswith("usage: sota-serve") and out.stderr.count("usage:") == 1
    assert out.stderr.rstrip().endswith("sota-serve: error: a COMMAND is required")


def test_predict_reads_the_image_files_of_a_folder_in_sorted_order(tiny_package, photos, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(photos[0], folder / "b.jpg")
    shutil.copy(photos[1], folder / "sub" / "c.JPG")
    shutil.copy(photos[1], folder / "a.jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "folder.png").mkdir()  # a folder named like an image is not one
    assert main(["predict", str(tiny_package), str(folder), str(photos[0]), "--json", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    names = [folder / "a.jpeg", folder / "b.jpg", folder / "sub" / "c.JPG", photos[0]]
    assert [r["image"] for r in results] == list(map(str, names))
    assert main(["predict", str(tiny_package), *map(str, names), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == results  # as if each file had been named


def test_predict_on_a_folder_without_images_exits_2_naming_it(tiny_package, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["predict", str(tiny_package), str(tmp_path)]) == 2
    assert f"{tmp_path}: a folder with no image files" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sota-serve 0.")


def test_import_keeps_only_the_formats_asked_for(tiny_package, tmp_path, monkeypatch):
    from sota_serve.package.loading import open_package, store_model_dir

    env = {**__import__("os").environ, "BENTOML_HOME": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "sota_serve.cli", "import", str(tiny_package), "--name", "slim",
                          "--formats", "onnx"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    stored = store_model_dir("slim:latest")
    assert stored is not None and not (stored / "model.pt").exists()
    package = open_package(stored)  # the rewritten card verifies
    assert package.verified and list(package.backends) == ["onnx"]
    bad = subprocess.run([sys.executable, "-m", "sota_serve.cli", "import", str(tiny_package), "--formats", "tflite"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tflite" in bad.stderr
