"""The container image (deploy/container/build.sh) built with podman and run: it becomes ready
and answers /classify as the package does offline.

Needs podman, runc and mmdebstrap (CI installs them: .ci/run), root or subuid ranges, and
PyPI for the image's Python packages; skipped with the reason where these cannot be had. The
base image is kept by name between runs; the model's image is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from bench.server import free_port
from sota_serve.cli import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a fresh machine builds both images

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "container" / "build.sh"
BASE = "localhost/sota-serve-base:bookworm"
# runc and container ulimits that start on hosts where podman's defaults do not
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "container" / "containers.conf")}
PORT_IN_CONTAINER = 8080  # as on KServe (deploy/kubernetes/inferenceservice.yaml): BENTOML_PORT


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


@pytest.fixture(scope="module")
def image(tiny_package, tmp_path_factory):
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"localhost/sota-serve-test:{uuid.uuid4().hex[:12]}"
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**PODMAN_ENV, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    base_cached = podman("image", "exists", BASE, check=False).returncode == 0
    bundle = trust_bundle()
    command = [str(BUILD), str(tiny_package), "--image", name, *(["--ca-bundle", bundle] if bundle else [])]
    start = time.monotonic()
    build = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert build.returncode == 0, f"build.sh failed:\n{build.stderr[-6000:]}"
    assert build.stdout.strip().splitlines()[-1] == name
    steps = [line for line in build.stderr.splitlines() if line.startswith("== ")]
    print(f"\nbuild: {seconds:.0f} s (base image {'cached' if base_cached else 'built'});"
          f" base {image_mb(BASE):.0f} MB, image {image_mb(name):.0f} MB; steps: {steps}")
    try:
        yield name
    finally:
        podman("rmi", "--force", name, check=False)


@pytest.fixture(scope="module")
def container(image):
    port = free_port()
    name = f"sota-serve-test-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    podman("run", "--detach", "--name", name,
           "--publish", f"127.0.0.1:{port}:{PORT_IN_CONTAINER}",
           "--env", f"BENTOML_PORT={PORT_IN_CONTAINER}", "--env", "SOTA_SERVE_DEVICE=cpu", image)
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
                logs = podman("logs", name, check=False)
                pytest.fail(f"container {state}, not ready after {time.monotonic() - start:.0f} s:\n"
                            f"{(logs.stdout + logs.stderr)[-4000:]}")
            time.sleep(0.5)
        print(f"\ncontainer: ready {time.monotonic() - start:.1f} s after podman run")
        yield url
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)


def offline(package: Path, photos: list[Path], tta: str, capsys) -> list[dict]:
    assert cli(["predict", str(package), *map(str, photos), "--tta", tta, "--backend", "onnx",
                "--json", "--device", "cpu", "--top-k", "3"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tta", ["none", "five_crop"])
def test_container_answers_as_the_package_does_offline(container, tiny_package, photos, tta, capsys):
    expected = offline(tiny_package, photos, tta, capsys)
    for photo, want in zip(photos, expected, strict=True):
        answer = httpx.post(f"{container}/classify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                            data={"tta": tta, "top_k": "3"}, timeout=60)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["tta"] == tta and got["model"] == "tiny-cnn:1"
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        for a, b in zip(got["predictions"], want["predictions"], strict=True):
            assert abs(a["score"] - b["score"]) < 1e-4
        assert got["ood"]["out_of_distribution"] is True  # the card's fit on digits travels with it


def test_container_serves_the_contract(container):
    assert httpx.get(f"{container}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{container}/card").json()["name"] == "tiny-cnn"
    refused = httpx.post(f"{container}/classify", files={"image": ("x.png", b"not an image", "image/png")})
    assert refused.status_code in (400, 415, 422) and "error" in refused.json()
