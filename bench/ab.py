"""sota-serve against LitServe in alternating rounds: a ratio that survives a drifting machine.

A small shared machine drifts by more between runs minutes apart than two servers differ
(BENCHMARKS.md, "Method"), and a full ``python -m bench`` measures each server once, minutes
apart. This starts both (one LitServe
peer per TTA policy, since its policy is fixed at start), warms them up, then runs short
closed-loop rounds, every server once per round in a rotating order, each server alone on the
machine (the others are paused with SIGSTOP: an idle LitServe polls at ~0.18 of a core), and
reports each round's req/s and the median of the per-round ratios, so a slow minute costs
both servers alike. ``--offline`` adds the offline pipeline (decode + model in this process, no
HTTP, the cores split as the server splits them) as one more participant of every round, for a
ratio of HTTP to offline that a drifting machine cannot fake either. LitServe runs model calls at once only from several worker processes:
each ``--litserve-workers`` figure is a peer of its own, and a round's ratio is against the
best of them. Prints a table; writes JSON.

``python -m bench.ab --model demo --tta none,five_crop --concurrency 32 --rounds 4``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.images import image_set
from bench.load import closed_loop
from bench.report import machine_line, model_fields, service_label, table, write_json
from bench.run import BenchConfig, Offline, machine_info, package_for
from bench.server import Server, env_settings
from sota_serve import formats
from sota_serve.device import resolve_device
from sota_serve.package.loading import open_package
from sota_serve.package.precision import CHOICES, choose
from sota_serve.progress import progress
from sota_serve.tta import CROPS_PER_IMAGE


def _round(server: Server, servers: list[Server], images: list[Path], tta: str | None, concurrency: int,
           seconds: float, processes: int | None) -> dict[str, Any]:
    """One closed-loop round on ``server`` while the other ``servers`` are paused."""
    for s in servers:
        if s is not server:
            s.pause()
    server.resume()
    url = f"{server.url}/classify"
    r = closed_loop(url, images, data={"tta": tta} if tta else None, concurrency=concurrency,
                    seconds=seconds, processes=processes)
    return {k: r[k] for k in ("throughput", "p50_ms", "p99_ms", "shed_503", "errors", "requests")}


OFFLINE = "offline pipeline (img/s)"


class OfflinePeer:
    """The offline pipeline as a participant of the rounds, with the device, model file and
    split of the cores that sota-serve's environment gives its server."""

    def __init__(self, package: Path, images: list[Path], env: dict[str, str], batch_crops: int) -> None:
        seen = {**os.environ, **env}  # what the server process sees (bench.server.Server)
        device = resolve_device(seen.get("SOTA_SERVE_DEVICE", "auto"))
        opened = open_package(package)
        served = choose(opened.card, opened.artifacts, formats.DEFAULT, device, seen.get("SOTA_SERVE_PRECISION", "auto"))
        self.pipeline = Offline.open(opened, images, BenchConfig(server_env=env).settings(device).plan(), served)
        self.batch_crops = batch_crops

    def round(self, servers: list[Server], tta: str, seconds: float) -> dict[str, Any]:
        for s in servers:
            s.pause()
        r = self.pipeline.run(tta, self.batch_crops, seconds)
        nan = float("nan")
        return {"throughput": r["images_per_s"], "p50_ms": nan, "p99_ms": nan, "shed_503": 0, "errors": 0,
                "requests": r["images"]}


def _ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[float]:
    return [a["throughput"] / b["throughput"] if b["throughput"] else float("nan")
            for a, b in zip(ours, theirs, strict=True)]


def compare(package: Path, images: list[Path], *, policies: list[str], concurrency: int, rounds: int,
            seconds: float, warmup_s: float, processes: int | None, batch_size: int,
            env: dict[str, str], litserve_workers: tuple[int, ...] = (1,),
            baseline_env: dict[str, str] | None = None, litserve_precision: str = "auto",
            offline: bool = False, baseline_root: Path | None = None) -> dict[str, Any]:
    """Per policy: each round runs every server once (the order rotates between rounds); a
    round's ratio is sota-serve's req/s over the best LitServe configuration's in that round.
    ``baseline_env``: a second sota-serve with these settings (on top of ``env``) runs in the
    same rounds, and ``ratios_to_baseline`` says what the first one's settings gain.
    ``baseline_root``: that second sota-serve runs from another checkout of the project (an
    earlier commit), so the ratio says what this version gains over that one.
    ``litserve_precision``: the artifact LitServe serves (``auto`` chooses as sota-serve does,
    so by default both run the same file and only the serving design differs)."""
    ours = Server(package, env=env)
    baseline = (Server(package, env={**env, **(baseline_env or {})}, **({"root": baseline_root} if baseline_root else {}))
                if baseline_env or baseline_root else None)
    base_name = "sota-serve (" + ", ".join([*(f"{k}={v}" for k, v in (baseline_env or {}).items()),
                                            *([f"from {baseline_root.name}"] if baseline_root else [])]) + ")"
    peers = {(tta, w): Server.litserve(package, tta=tta, workers=w, precision=litserve_precision,
                                       max_batch_size=max(1, batch_size // CROPS_PER_IMAGE[tta]))
             for tta in policies for w in litserve_workers}
    servers = [ours, *([baseline] if baseline else []), *peers.values()]
    try:
        for s in servers:
            s.wait_ready()
        reference = OfflinePeer(package, images, env, batch_size) if offline else None
        out: dict[str, Any] = {}
        for tta in policies:
            targets = {"sota-serve": (ours, tta), **({base_name: (baseline, tta)} if baseline else {}),
                       **{service_label("litserve", w): (peers[tta, w], None) for w in litserve_workers}}
            names = list(targets) + ([OFFLINE] if reference else [])
            peer_names = [service_label("litserve", w) for w in litserve_workers]
            for server, param in targets.values():  # warm-up, not recorded
                _round(server, servers, images, param, concurrency, warmup_s, processes)
            rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for i in progress(range(rounds), desc=f"A/B {tta}"):
                # Rotate who goes first, so that nobody always follows the same server's tail.
                for name in names[i % len(names):] + names[: i % len(names)]:
                    if name == OFFLINE and reference is not None:
                        rows[name].append(reference.round(servers, tta, seconds))
                        continue
                    server, param = targets[name]
                    rows[name].append(_round(server, servers, images, param, concurrency, seconds, processes))
            by_peer = {name: _ratios(rows["sota-serve"], rows[name]) for name in peer_names}
            ratios = [min(r) for r in zip(*by_peer.values(), strict=True)]  # against the round's best peer
            out[tta] = {"rounds": rows, "ratios": ratios, "median_ratio": statistics.median(ratios),
                        "ratios_by_peer": by_peer,
                        "median_ratio_by_peer": {n: statistics.median(r) for n, r in by_peer.items()},
                        "median_req_per_s": {n: statistics.median(r["throughput"] for r in rs)
                                             for n, rs in rows.items()}}
            if reference:
                to_offline = _ratios(rows["sota-serve"], rows[OFFLINE])
                out[tta] |= {"ratios_to_offline": to_offline, "median_ratio_to_offline": statistics.median(to_offline)}
            if baseline:
                to_base = _ratios(rows["sota-serve"], rows[base_name])
                out[tta] |= {"baseline": base_name, "ratios_to_baseline": to_base,
                             "median_ratio_to_baseline": statistics.median(to_base)}
        return out
    finally:
        for s in servers:
            s.stop()


def render(result: dict[str, Any]) -> str:
    lines = [machine_line(result["machine"])]
    for tta, r in result["policies"].items():
        rows = [[name, *(x["throughput"] for x in rs), r["median_req_per_s"][name]] for name, rs in r["rounds"].items()]
        label = "ratio" if len(r.get("ratios_by_peer", {})) < 2 else "ratio to best"
        rows.append([label, *(f"{x:.2f}x" for x in r["ratios"]), f"{r['median_ratio']:.2f}x"])
        if "ratios_to_offline" in r:
            rows.append(["HTTP / offline", *(f"{x:.2f}x" for x in r["ratios_to_offline"]),
                         f"{r['median_ratio_to_offline']:.2f}x"])
        if "ratios_to_baseline" in r:
            rows.append(["ratio to baseline", *(f"{x:.2f}x" for x in r["ratios_to_baseline"]),
                         f"{r['median_ratio_to_baseline']:.2f}x"])
        errors = sum(x["errors"] for rs in r["rounds"].values() for x in rs)  # offline rows have none
        shed = sum(x["shed_503"] for rs in r["rounds"].values() for x in rs)
        header = ["", *(f"round {i + 1}" for i in range(len(r["ratios"]))), "median"]
        lines.append(table(f"[{result['model']}] tta={tta}, {result['concurrency']} clients, req/s"
                            f" ({errors} errors, {shed} shed with 503)", header, rows))
    return "\n".join(lines)


def checkout_commit(checkout: Path | None) -> str:
    """The commit a baseline checkout is at (short hash), which a result records rather than
    the checkout's path on the machine that measured; "" without a baseline checkout."""
    if checkout is None:
        return ""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--baseline-checkout {checkout}: not a git checkout ({done.stderr.strip()})")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo, xresnet50, tiny, or a package directory")
    p.add_argument("--tta", default="none,five_crop", help="comma list of policies")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0, help="per round and server")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded load per server first")
    p.add_argument("--processes", type=int, help="load-generator processes (default: one per 4 cores)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="LitServe's batch, in crops (divided by the crops per image of the policy)")
    p.add_argument("--litserve-workers", default=None,
                   help="comma list of LitServe workers_per_device, each a peer (default: 1 and one per core"
                        " on a CPU, 1 and 4 on a GPU)")
    p.add_argument("--litserve-precision", default="auto", choices=CHOICES,
                   help="the artifact LitServe serves; auto: the one sota-serve's auto picks, so that only"
                        " the serving design differs; fp32: what serving model.onnx as it is gives")
    p.add_argument("--images", default="imagenet", choices=("imagenet", "mix"))
    p.add_argument("--env", action="append", default=[], metavar="SOTA_SERVE_X=V",
                   help="a setting for sota-serve (repeatable)")
    p.add_argument("--baseline-env", action="append", default=[], metavar="SOTA_SERVE_X=V",
                   help="run a second sota-serve with this setting too (repeatable), in the same rounds")
    p.add_argument("--baseline-checkout", type=Path, metavar="DIR",
                   help="run a second sota-serve from this checkout of the project in the same rounds"
                        " (git worktree add DIR COMMIT): the ratio to an earlier version")
    p.add_argument("--offline", action="store_true",
                   help="the offline pipeline takes part in every round too (ratio of HTTP to offline)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", help="file stem (default: ab-<device>-<model>)")
    args = p.parse_args(argv)
    cfg = BenchConfig(images=args.images)
    package = package_for(args.model, cfg)
    if package is None:
        return 1
    images = image_set(cfg.images, cfg.cache / "images")
    policies = args.tta.split(",")
    env = env_settings(args.env)
    baseline_env = env_settings(args.baseline_env)
    if args.litserve_workers:
        cfg.litserve_workers = tuple(int(w) for w in args.litserve_workers.split(","))
    device = machine_info()["device"]
    result = {**model_fields(args.model, open_package(package).card.tag), "concurrency": args.concurrency,
              "seconds": args.seconds, "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "server_env": env,
              "baseline_env": baseline_env, "baseline_commit": checkout_commit(args.baseline_checkout),
              "litserve_precision": args.litserve_precision,
              "policies": compare(package, images, policies=policies, concurrency=args.concurrency,
                                  rounds=args.rounds, seconds=args.seconds, warmup_s=args.warmup,
                                  processes=args.processes, batch_size=args.max_batch_size,
                                  env=env, litserve_workers=cfg.peers(device), baseline_env=baseline_env,
                                  litserve_precision=args.litserve_precision, offline=args.offline,
                                  baseline_root=args.baseline_checkout and args.baseline_checkout.resolve())}
    print(render(result))
    write_json(result, Path(args.out) / f"{args.name or f'ab-{device}-{Path(args.model).name}'}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
