"""The container images (deploy/container/build.sh) built with podman and run: the CPU image is
at most 600 MB, becomes ready and answers /classify as the package does offline; the GPU image
(``build.sh --gpu``: ONNX Runtime's CUDA build, with CUDA and cuDNN from their wheels), started
on a machine without a GPU, says in its log that it runs on the CPU and answers there.

Needs podman, runc and mmdebstrap (CI installs them: .ci/run), root or subuid ranges, and
PyPI for the images' Python packages; skipped with the reason where these cannot be had. The
base image is kept by name between runs; the model's images are removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from bench.server import free_port
from sota_serve.cli import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a fresh machine builds every image

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "container" / "build.sh"
BASE = "localhost/sota-serve-base:bookworm"
# runc and container ulimits that start on hosts where podman's defaults do not
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "container" / "containers.conf")}
PORT_IN_CONTAINER = 8080  # as on KServe (deploy/kubernetes/inferenceservice.yaml): BENTOML_PORT
GRPC_IN_CONTAINER = 8001  # the image's SOTA_SERVE_GRPC_PORT (deploy/container/build.sh)
CPU_IMAGE_MAX_MB = 600
#: what the GPU image logs where it finds no GPU (sota_serve/runtime/onnx.py)
NO_GPU_LINE = "ONNX Runtime's CUDA build finds no CUDA device"


def podman_unavailable() -> str | None:
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install podman runc mmdebstrap uidmap)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, env=PODMAN_ENV)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-300:]}"
    return None


def trust_bundle() -> str | None:
    """The CA bundle this machine trusts, for the build's downloads (behind a TLS-intercepting
    proxy the image's own bundle would not do)."""
    for path in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and Path(path).is_file():
            return path
    return None


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, env=PODMAN_ENV)


def image_mb(name: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout) / 1e6


def build(package: Path, home: Path, *flags: str) -> str:
    """Build the image of ``package`` with build.sh ``flags``; its name."""
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"localhost/sota-serve-test:{uuid.uuid4().hex[:12]}"
    env = {**PODMAN_ENV, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    base_cached = podman("image", "exists", BASE, check=False).returncode == 0
    bundle = trust_bundle()
    command = [str(BUILD), str(package), *flags, "--image", name, *(["--ca-bundle", bundle] if bundle else [])]
    start = time.monotonic()
    built = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert built.returncode == 0, f"build.sh {' '.join(flags)} failed:\n{built.stderr[-6000:]}"
    assert built.stdout.strip().splitlines()[-1] == name
    steps = [line for line in built.stderr.splitlines() if line.startswith("== ")]
    print(f"\nbuild {' '.join(flags) or '(cpu)'}: {seconds:.0f} s (base image {'cached' if base_cached else 'built'});"
          f" base {image_mb(BASE):.0f} MB, image {image_mb(name):.0f} MB; steps: {steps}")
    return name


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml-home")


@pytest.fixture(scope="module")
def image(tiny_package, bentoml_home):
    name = build(tiny_package, bentoml_home)
    try:
        yield name
    finally:
        podman("rmi", "--force", name, check=False)


@pytest.fixture(scope="module")
def gpu_image(tiny_package, bentoml_home, image):  # after the CPU image: the GPU build reuses its layers
    name = build(tiny_package, bentoml_home, "--gpu")
    try:
        yield name
    finally:
        podman("rmi", "--force", name, check=False)


@contextmanager
def started(image: str, *env: str) -> Iterator[tuple[str, str, str]]:
    """(its URL, the container's name, its gRPC address) of ``image`` run with ``env``
    (NAME=VALUE), once ready."""
    port, grpc_port = free_port(), free_port()
    name = f"sota-serve-test-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    podman("run", "--detach", "--name", name,
           "--publish", f"127.0.0.1:{port}:{PORT_IN_CONTAINER}",
           "--publish", f"127.0.0.1:{grpc_port}:{GRPC_IN_CONTAINER}",
           "--env", f"BENTOML_PORT={PORT_IN_CONTAINER}", *(f"--env={e}" for e in env), image)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = start + 180
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                pytest.fail(f"container {state}, not ready after {time.monotonic() - start:.0f} s:\n"
                            f"{logs(name)[-4000:]}")
            time.sleep(0.5)
        print(f"\ncontainer of {image}: ready {time.monotonic() - start:.1f} s after podman run")
        yield url, name, f"127.0.0.1:{grpc_port}"
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)


def logs(container: str) -> str:
    said = podman("logs", container, check=False)
    return said.stdout + said.stderr


@pytest.fixture(scope="module")
def container(image):
    with started(image, "SOTA_SERVE_DEVICE=cpu") as (url, _, grpc_address):
        yield url, grpc_address


def offline(package: Path, photos: list[Path], tta: str, capsys) -> list[dict]:
    assert cli(["predict", str(package), *map(str, photos), "--tta", tta, "--backend", "onnx",
                "--json", "--device", "cpu", "--top-k", "3"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tta", ["none", "five_crop"])
def test_container_answers_as_the_package_does_offline(container, tiny_package, photos, tta, capsys):
    url, _ = container
    expected = offline(tiny_package, photos, tta, capsys)
    for photo, want in zip(photos, expected, strict=True):
        answer = httpx.post(f"{url}/classify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                            data={"tta": tta, "top_k": "3"}, timeout=60)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["tta"] == tta and got["model"] == "tiny-cnn:1"
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        for a, b in zip(got["predictions"], want["predictions"], strict=True):
            assert abs(a["score"] - b["score"]) < 1e-4
        assert got["ood"]["out_of_distribution"] is True  # the card's fit on digits travels with it


def test_the_cpu_image_is_small(image):
    """ONNX Runtime's CPU build and no build tools: the base image and the venv."""
    assert image_mb(image) <= CPU_IMAGE_MAX_MB, f"the CPU image is {image_mb(image):.0f} MB"


def test_the_gpu_image_serves_on_the_cpu_where_there_is_no_gpu(gpu_image, tiny_package, photos, capsys):
    """Started as on a GPU host (SOTA_SERVE_DEVICE left at auto) but given no GPU: it serves on
    the CPU, answers as the package does offline, and its log says so in one line."""
    expected = offline(tiny_package, photos[:1], "none", capsys)[0]
    with started(gpu_image) as (url, name, _):
        photo = photos[0]
        answer = httpx.post(f"{url}/classify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                            data={"top_k": "3"}, timeout=60)
        said = logs(name)
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in expected["predictions"]]
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, expected["predictions"], strict=True))
    lines = [line for line in said.splitlines() if NO_GPU_LINE in line]
    assert lines and all("running on the CPU" in line for line in lines), said[-4000:]
    assert "ready: serving tiny-cnn:1 on cpu" in said, said[-4000:]
    print(f"\nGPU image, no GPU: {lines[0].strip()}")


def test_container_serves_the_contract(container):
    url, grpc_address = container
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/card").json()["name"] == "tiny-cnn"
    refused = httpx.post(f"{url}/classify", files={"image": ("x.png", b"not an image", "image/png")})
    assert refused.status_code in (400, 415, 422) and "error" in refused.json()
    client = grpcclient.InferenceServerClient(grpc_address)  # the Open Inference Protocol over gRPC, on by default
    try:
        assert client.is_server_live() and client.is_model_ready("tiny-cnn")
    finally:
        client.close()
