"""How the service scales with worker processes: one server per ``--workers`` value, the
same closed-loop load against each.

``python -m dev.probes.scaling PACKAGE --workers 1,4,8,16 --concurrency 256 [--env K=V] [--profile]``
prints a table and writes ``scaling-<name>.json``. ``--profile`` samples every server process
with py-spy during each load (``--format raw``: collapsed stacks, one file per run), when
py-spy is on the PATH or next to this Python.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.images import image_set
from bench.load import closed_loop
from bench.report import write_json
from bench.server import Server, env_settings


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def run(package: Path, workers: list[int], *, concurrency: int, seconds: float, tta: str,
        env: dict[str, str], out: Path, name: str, profile: bool, processes: int | None) -> list[dict[str, Any]]:
    images = image_set("imagenet", Path("bench/.cache/images"))
    spy = _py_spy() if profile else None
    rows = []
    for n in workers:
        with Server(package, env={**env, "SOTA_SERVE_WORKERS": str(n)}) as server:
            closed_loop(f"{server.url}/classify", images, data={"tta": tta}, concurrency=concurrency,
                        seconds=2, processes=processes)  # warm-up, not reported
            recorder = None
            if spy:
                stacks = out / f"profile-{name}-w{n}.txt"
                recorder = subprocess.Popen(
                    [spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--format", "raw",
                     "--duration", str(int(seconds)), "--rate", "50", "--nonblocking", "-o", str(stacks)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = closed_loop(f"{server.url}/classify", images, data={"tta": tta},
                                 concurrency=concurrency, seconds=seconds, processes=processes)
            if recorder:
                recorder.wait(timeout=60)
        rows.append({"workers": n, "tta": tta, **result})
        print(f"workers {n:3d}  {result['throughput']:8.1f} req/s  p50 {result['p50_ms']:7.1f} ms"
              f"  p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}  503 {result['shed_503']}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dev.probes.scaling", description=__doc__.split("\n")[0])
    p.add_argument("package", type=Path)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--tta", default="none")
    p.add_argument("--processes", type=int, help="load-generator processes")
    p.add_argument("--env", action="append", default=[], metavar="SOTA_SERVE_X=V")
    p.add_argument("--name", default="scaling")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = env_settings(args.env)
    rows = run(args.package, [int(w) for w in args.workers.split(",")], concurrency=args.concurrency,
               seconds=args.seconds, tta=args.tta, env=env, out=args.out, name=args.name,
               profile=args.profile, processes=args.processes)
    write_json({"package": str(args.package), "env": env, "rows": rows}, args.out / f"scaling-{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
