"""A serving-only install (``pip install 'sota-serve[serve]'``): small, with ONNX Runtime's CPU
build and without torch or fastai, and it serves a package over HTTP and runs the core CLI; and
the core alone (``pip install sota-serve``), which carries no runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.server import Server
from tests.test_server import post

ROOT = Path(__file__).resolve().parents[1]
#: 351 MiB measured with ONNX Runtime's CPU build (623 MiB with the CUDA one, which `serve` no longer brings)
MAX_BYTES = 512 << 20


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_serving_install_serves_without_torch_or_fastai(tmp_path, tiny_package, photos):
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{ROOT}[serve]"],
                             capture_output=True, text=True, timeout=840)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]
    size = _size(venv)
    assert size < MAX_BYTES, f"the serving install is {size / 2**20:.0f} MiB"
    print(f"serving install: {size / 2**20:.0f} MiB")  # for the record (pytest -s)
    for module in ("torch", "torchvision", "fastai", "sklearn"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "No module named" in probe.stderr, f"{module} is installed"
    # ONNX Runtime's CPU build, not the CUDA one (the serve-gpu extra's)
    for dist, installed in (("onnxruntime", True), ("onnxruntime-gpu", False)):
        probe = subprocess.run([str(python), "-m", "pip", "show", "-q", dist], capture_output=True, text=True)
        assert (probe.returncode == 0) == installed, f"{dist} installed: {probe.returncode == 0}"
    # uvicorn's C loop and parser, which its "auto" settings pick (BentoML asks for plain uvicorn)
    probe = subprocess.run([str(python), "-c", "import uvloop, httptools"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr

    cli = str(bin_dir / "sota-serve")
    inspect = subprocess.run([cli, "inspect", str(tiny_package)], capture_output=True, text=True, cwd=tmp_path)
    assert inspect.returncode == 0 and "tiny-cnn:1" in inspect.stdout, inspect.stderr
    predict = subprocess.run([cli, "predict", str(tiny_package), str(photos[0]), "--json", "--tta", "five_crop"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr
    assert len(json.loads(predict.stdout)[0]["predictions"]) == 3
    train = subprocess.run([cli, "train", "--preset", "digits"], capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 2 and "pip install 'sota-serve[train]'" in train.stderr
    # the benchmark is not in the wheel: no top-level `bench`, and the command says where it runs
    assert not list(venv.glob("lib/python*/site-packages/bench"))
    bench = subprocess.run([cli, "bench", "--quick"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert bench.returncode == 2 and "pip install -e '.[bench]'" in bench.stderr, bench.stderr

    command = [str(bin_dir / "bentoml"), "serve", "bento.service:SotaServe", "--port", "{port}", "--host", "127.0.0.1"]
    with Server(tiny_package, command=command, home=tmp_path / "bentoml",
                env={"SOTA_SERVE_DEVICE": "cpu", "PATH": f"{bin_dir}:/usr/bin:/bin"}) as server:
        answer = post(server, "/classify", {"image": (photos[0].name, photos[0].read_bytes())}, {"tta": "five_crop"})
        assert answer.status_code == 200 and answer.json()["tta"] == "five_crop"
        want = json.loads(predict.stdout)[0]["predictions"]
        got = answer.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(got, want, strict=True))
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_core_installs_without_a_runtime_and_names_both_builds(tmp_path, tiny_package, photos):
    """`pip install sota-serve` brings no ONNX Runtime (the `cpu` and `gpu` extras do): it
    installs where neither build has a wheel, inspects packages, and a command that needs the
    runtime stops with one line naming both extras."""
    venv = tmp_path / "core-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, cli = venv / "bin" / "python", str(venv / "bin" / "sota-serve")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)],
                             capture_output=True, text=True, timeout=540)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]
    for module in ("onnxruntime", "bentoml", "torch"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "No module named" in probe.stderr, f"{module} is installed"
    inspect = subprocess.run([cli, "inspect", str(tiny_package)], capture_output=True, text=True, cwd=tmp_path)
    assert inspect.returncode == 0 and "tiny-cnn:1" in inspect.stdout, inspect.stderr
    predict = subprocess.run([cli, "predict", str(tiny_package), str(photos[0])], capture_output=True, text=True,
                             cwd=tmp_path)
    assert predict.returncode == 2 and predict.stdout == "", predict.stdout + predict.stderr
    assert predict.stderr.count("\n") == 1, predict.stderr  # one line, no traceback
    assert "ONNX Runtime is not installed" in predict.stderr, predict.stderr
    assert "pip install 'sota-serve[cpu]'" in predict.stderr and "pip install 'sota-serve[gpu]'" in predict.stderr
