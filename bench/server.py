"""``bentoml serve`` as a real subprocess on a free port (used by benchmarks and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sota_serve import formats

ROOT = Path(__file__).resolve().parents[1]


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
    ) -> None:
        """``root``: the checkout whose service runs (another one than this, for an A/B of two
        versions of the project: its own code is imported, from its own directory)."""
        model = _absolute(model)  # the server runs in the repository root, not the caller's directory
        self.port = free_port()
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

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
