"""``bentoml serve`` as a real subprocess on a free port (used by benchmarks and tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sota_serve import formats
from sota_serve.package.card import ModelCard

ROOT = Path(__file__).resolve().parents[1]
#: MLServer's own venv (``make mlserver-peer``): its pins conflict with the project's
MLSERVER_VENV = ROOT / "bench" / ".cache" / "mlserver-venv"


def env_settings(pairs: list[str]) -> dict[str, str]:
    """``["SOTA_SERVE_X=V", ...]`` (the benchmarks' repeatable ``--env``) as a dict."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise SystemExit(f"--env takes NAME=VALUE, got {', '.join(bad)}")
    return dict(kv.split("=", 1) for kv in pairs)


def _absolute(model: str | Path) -> str | Path:
    """A package path as an absolute one; a model-store tag as it is."""
    return Path(model).resolve() if Path(model).exists() else model


def _service_of(root: Path) -> str:
    """The service a checkout's ``bentoml serve`` runs: its bentofile.yaml's ``service``."""
    import yaml

    return yaml.safe_load((root / "bentofile.yaml").read_text())["service"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlserver_settings(folder: Path, package: Path, *, http_port: int, grpc_port: int, metrics_port: int,
                      workers: int = 2, threads: int = 1, max_batch_size: int = 32, max_batch_time: float = 0.01,
                      precision: str = "auto") -> dict[str, dict]:
    """Writes MLServer's ``settings.json`` (the server) and ``model-settings.json`` (the model:
    bench/mlserver_peer.py's runtime on ``package``) into ``folder``, the folder that
    ``mlserver start`` takes; returns both, by file name. Why these values: bench/mlserver_peer.py."""
    package = Path(package).resolve()
    card = ModelCard.load(package / "card.json")
    server = {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
              # the multiprocess metrics' files, which would otherwise go to the current directory
              "metrics_dir": str(folder / "metrics"), "parallel_workers": workers,
              "model_repository_root": str(folder),
              # no line per request, as sota-serve's default: MLServer 1.7.1 asks uvicorn for no
              # access log, yet with its metrics server on (the default) uvicorn logs every request
              "logging_settings": {"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"uvicorn.access": {"level": "WARNING"}}}}
    model = {"name": card.name, "implementation": "bench.mlserver_peer.PackageModel",
             "max_batch_size": max_batch_size, "max_batch_time": max_batch_time,
             "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
             "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, card.num_classes]}],
             "parameters": {"uri": str(package), "version": card.version,
                            "extra": {"precision": precision, "threads": threads}}}
    written = {"settings.json": server, "model-settings.json": model}
    for name, content in written.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return written


class Server:
    def __init__(
        self,
        model: str | Path,
        *,
        backend: str = formats.DEFAULT,
        env: dict[str, str] | None = None,
        home: Path | None = None,
        target: str | None = None,
        command: list[str] | None = None,
        ready_path: str = "/readyz",
        root: Path = ROOT,
        port: int | None = None,
        scratch: tempfile.TemporaryDirectory | None = None,
    ) -> None:
        """``root``: the checkout whose service runs (another one than this, for an A/B of two
        versions of the project: its own code is imported, from its own directory); ``port``:
        the one a peer's settings already name; ``scratch``: a folder the server uses, removed
        when it stops."""
        model = _absolute(model)  # the server runs in the repository root, not the caller's directory
        self.port = port or free_port()
        self.scratch = scratch
        self.grpc_port: int | None = None  # a peer's gRPC port (sota-serve's is SOTA_SERVE_GRPC_PORT)
        self.settings: dict[str, Any] = {}  # a peer's settings, as written
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "SOTA_SERVE_MODEL": str(model), "SOTA_SERVE_BACKEND": backend,
                   "SOTA_SERVE_DEVICE": os.environ.get("SOTA_SERVE_DEVICE", "auto"),
                   "PYTHONWARNINGS": "ignore", **(env or {})}
        if home:
            environ["BENTOML_HOME"] = str(home)
        if root != ROOT:
            environ["PYTHONPATH"] = str(root)
            target = target or _service_of(root)
        self.log = tempfile.TemporaryFile("w+")
        self.ready_path = ready_path
        cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", *([target] if target else []),
               "--port", str(self.port), "--host", "127.0.0.1"]
        if command:  # another server (a peer): its command, with {port} filled in
            cmd = [part.format(port=self.port) for part in command]
        self.proc = subprocess.Popen(cmd, cwd=root, env=environ, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()[-4000:]}")

    @classmethod
    def litserve(cls, model: str | Path, *, tta: str = "none", max_batch_size: int = 32,
                 precision: str = "auto", workers: int = 1) -> Server:
        """The LitServe peer (bench/litserve_peer.py) on the same package, with ``workers``
        inference processes that share the cores."""
        command = [sys.executable, "-m", "bench.litserve_peer", str(_absolute(model)), "--port", "{port}",
                   "--tta", tta, "--max-batch-size", str(max_batch_size), "--precision", precision,
                   "--workers-per-device", str(workers)]
        return cls(model, command=command, ready_path="/health")

    @classmethod
    def mlserver(cls, model: str | Path, *, venv: Path = MLSERVER_VENV, **settings: Any) -> Server:
        """The MLServer peer (bench/mlserver_peer.py) on the same package, from MLServer's own
        ``venv``, its settings written into a fresh folder (``settings``: as for
        :func:`mlserver_settings`); ``grpc_port`` is the port of its gRPC."""
        mlserver = Path(venv) / "bin" / "mlserver"
        if not mlserver.exists():
            raise SystemExit(f"no MLServer at {mlserver}: `make mlserver-peer` makes its venv")
        scratch = tempfile.TemporaryDirectory(prefix="mlserver-peer-")
        folder = Path(scratch.name)
        port, grpc_port = free_port(), free_port()
        written = mlserver_settings(folder, Path(_absolute(model)), http_port=port, grpc_port=grpc_port,
                                    metrics_port=free_port(), **settings)
        name = written["model-settings.json"]["name"]
        server = cls(model, command=[str(mlserver), "start", str(folder)], ready_path=f"/v2/models/{name}/ready",
                     port=port, scratch=scratch, env={"PYTHONPATH": str(ROOT)})  # MLServer imports bench.mlserver_peer
        server.grpc_port, server.settings = grpc_port, written
        return server

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def pause(self) -> None:
        """Stop every process of the server (SIGSTOP), warm state kept: an idle LitServe
        polls its queues at ~0.18 of a core, which would be taken from the server measured."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process group would not act on SIGTERM
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        if self.scratch is not None:
            self.scratch.cleanup()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
