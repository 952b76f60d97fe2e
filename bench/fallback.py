"""The TTA fallback ladder under load: requests that all ask for one policy (five-crop by
default), against a server with the ladder off and one with it on, from closed-loop clients
(each sends its next request when its answer is in) and at open-loop rates (requests arrive at
a rate whatever the answers, as from many independent users).

For each run: the share of requests answered (200) and refused (503), the share of answers
served with a cheaper policy than asked (from the server's ``sota_serve_tta_answers_total``
counter, read before and after), p50/p99 latency, and the accuracy those answers can expect
(the card's validation accuracy of each served policy, weighted by how many were served).

    python -m bench.fallback [--model packages/sota-demo] [--concurrency 256,512] [--rates 200,250] [--seconds 20]
        [--tta five_crop] [--budget-s S] [--env SOTA_SERVE_X=V ...] [--out bench/results/fallback.json]

With ``--sweep 0.5,1,1.5,2`` it first measures the capacity for the policy and for ``none``
(closed-loop clients, ladder off) and then offers open-loop arrivals at those multiples of the
policy's capacity to three servers, the ladder off, on, and on with strict budgets, and plots
p99 against the offered load with the budget and ``none``'s capacity (past which no ladder can
hold a budget) as lines (the JSON's name, ``.png``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.images import image_set
from bench.load import closed_loop, open_loop
from bench.report import table, write_json
from bench.run import BenchConfig, machine_info
from bench.server import Server, env_settings
from sota_serve.package.card import ModelCard, accuracy_key
from sota_serve.serving.admission import FORECAST_HORIZON_S
from sota_serve.serving.fallback import REFUSED

_SERIES = re.compile(r'sota_serve_tta_answers_total\{requested="([a-z_]+)",served="([a-z_]+)"\} (\S+)')


def answers_by_policy(url: str) -> dict[tuple[str, str], float]:
    """The server's answer counter: (requested, served) -> answers so far."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(m.group(1), m.group(2)): float(m.group(3)) for m in _SERIES.finditer(text)}


def expected_accuracy(card: ModelCard, served: dict[str, float]) -> float | None:
    """The card's accuracy of each served policy, weighted by its answers."""
    total = sum(served.values())
    if not total or card.metrics is None:
        return None
    values = {p: getattr(card.metrics, accuracy_key(p)) for p in served}
    if any(v is None for v in values.values()):
        return None
    return sum(values[p] * n for p, n in served.items()) / total


def measure(server: Server, card: ModelCard, images: list[Path], *, tta: str, seconds: float,
            concurrency: int | None = None, rate: float | None = None) -> dict[str, Any]:
    """One run: ``concurrency`` closed-loop clients, or requests arriving at ``rate`` per second."""
    url, data = f"{server.url}/classify", {"tta": tta}
    before = answers_by_policy(server.url)
    if rate is not None:
        load = open_loop(url, images, data=data, rate=rate, seconds=seconds)
    else:
        assert concurrency is not None, "measure needs a concurrency or a rate"
        load = closed_loop(url, images, data=data, concurrency=concurrency, seconds=seconds)
    after = answers_by_policy(server.url)
    served: dict[str, float] = {}
    for (requested, policy), n in after.items():
        if requested == tta and (gained := n - before.get((requested, policy), 0.0)):
            served[policy] = gained
    refused = served.pop(REFUSED, 0.0)  # a strict budget's 503s: not answers
    answered = sum(served.values())
    return {
        "load": f"{rate:g} req/s" if rate is not None else f"{concurrency} clients",
        "concurrency": concurrency, "rate": rate, "requests": load["requests"], "ok": load["ok"], "shed_503": load["shed_503"],
        "errors": load["errors"], "answered_share": load["ok"] / load["requests"] if load["requests"] else 0.0,
        "degraded_share": 1 - served.get(tta, 0.0) / answered if answered else 0.0,
        "served": {p: int(n) for p, n in sorted(served.items())}, "refused_strict": int(refused),
        "throughput": load["throughput"],
        "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "expected_accuracy": expected_accuracy(card, served),
        **{key: load[key] for key in ("p999_ms", "answered_p99_ms", "answered_p999_ms", "answered_max_ms")
           if key in load},
    }


MODES = {"off": {"SOTA_SERVE_TTA_FALLBACK": "false"}, "on": {"SOTA_SERVE_TTA_FALLBACK": "true"},
         "strict": {"SOTA_SERVE_TTA_FALLBACK": "true", "SOTA_SERVE_TTA_BUDGET_STRICT": "true"}}


def sweep(model: Path, card: ModelCard, images: list[Path], *, tta: str, factors: list[float], seconds: float,
          given: dict[str, str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(the capacity for ``tta`` and for ``none`` in req/s, one run per mode and offered load).

    ``none``'s capacity is the most that any ladder can answer: past it even plain requests
    queue, whatever is degraded."""
    capacity: dict[str, float] = {}
    with Server(model, env={**given, **MODES["off"]}) as server:
        closed_loop(f"{server.url}/classify", images, data={"tta": tta}, concurrency=32, seconds=3)  # warm
        for policy in dict.fromkeys((tta, "none")):
            capacity[policy] = closed_loop(f"{server.url}/classify", images, data={"tta": policy}, concurrency=64,
                                           seconds=seconds)["throughput"]
            print(f"capacity: {capacity[policy]:.1f} req/s of {policy} (64 closed-loop clients, ladder off)",
                  file=sys.stderr)
    runs: list[dict[str, Any]] = []
    for mode, env in MODES.items():
        with Server(model, env={**given, **env}) as server:
            closed_loop(f"{server.url}/classify", images, data={"tta": tta}, concurrency=32, seconds=3)  # warm
            time.sleep(FORECAST_HORIZON_S)  # the warm-up's queue drains and its forecast misses expire
            for factor in factors:
                run = {"mode": mode, "factor": factor, **measure(server, card, images, tta=tta, seconds=seconds,
                                                                 rate=factor * capacity[tta])}
                runs.append(run)
                print(f"{mode:6s} {factor:g}x: {run['ok']}/{run['requests']} answered, {run['shed_503']} x 503,"
                      f" {100 * run['degraded_share']:.1f} % degraded, p99 {run['p99_ms']:.0f} ms", file=sys.stderr)
    return capacity, runs


def plot_sweep(runs: list[dict[str, Any]], capacity: float, budget_s: float, title: str, path: Path,
               plain_capacity: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for mode, marker in zip(MODES, "osD", strict=True):
        mine = [r for r in runs if r["mode"] == mode]
        key = "answered_p99_ms" if mode == "strict" else "p99_ms"
        label = "strict (answers' p99)" if mode == "strict" else f"ladder {mode}"
        ax.plot([r["factor"] for r in mine], [r[key] / 1000 for r in mine], marker=marker, label=label)
    ax.axhline(budget_s, color="grey", linestyle="--", label=f"budget {budget_s:g} s")
    if plain_capacity:  # past it even plain answers queue: no ladder can hold a budget there
        ax.axvline(plain_capacity / capacity, color="grey", linestyle=":",
                   label=f"capacity for none ({plain_capacity:.0f} req/s)")
    ax.set(xlabel=f"offered load (x the capacity for the policy asked, {capacity:.0f} req/s)", ylabel="p99 latency (s)",
           yscale="log")
    ax.set_title(title, fontsize=9)  # a model-store tag makes it long
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _sweep_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    def ms(value: float) -> str:
        return f"{value:.0f}" if value == value else "n/a"  # nan: no answer in the run

    return [[r["mode"], f"{r['factor']:g}x ({r['rate']:.0f}/s)", f"{100 * r['answered_share']:.1f} %", r["shed_503"],
             ms(r["p50_ms"]), ms(r["p99_ms"]), ms(r["p999_ms"]), ms(r["answered_p99_ms"]), ms(r["answered_max_ms"]),
             f"{100 * r['degraded_share']:.1f} %",
             "n/a" if r["expected_accuracy"] is None else f"{100 * r['expected_accuracy']:.2f} %"] for r in runs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fallback", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="packages/sota-demo", help="package directory (default: the demo)")
    p.add_argument("--concurrency", default="256,512", help="comma list of closed-loop client counts ('' for none)")
    p.add_argument("--rates", default="200,250", help="comma list of open-loop arrival rates, req/s ('' for none)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of load per run")
    p.add_argument("--tta", default="five_crop", help="the policy every request asks for")
    p.add_argument("--budget-s", type=float, help="SOTA_SERVE_TTA_BUDGET_S (default: the server's, 1 s)")
    p.add_argument("--env", action="append", default=[], metavar="SOTA_SERVE_X=V",
                   help="a server setting for both servers (repeatable), e.g. SOTA_SERVE_MAX_WAIT_S=2")
    p.add_argument("--images", default="imagenet", help="image set: imagenet or mix (bench/images.py)")
    p.add_argument("--sweep", default="", help="comma list of multiples of the capacity for --tta to offer"
                                               " open-loop to the ladder off, on and strict (e.g. 0.5,1,1.5,2)")
    p.add_argument("--out", default="bench/results/fallback.json", help="where the JSON goes")
    args = p.parse_args(argv)
    model = Path(args.model)
    if not (model / "card.json").exists():
        print(f"no model package at {model}: run `sota-serve demo` first or give --model", file=sys.stderr)
        return 2
    card = ModelCard.load(model / "card.json")
    images = image_set(args.images, Path("bench/.cache/images"))
    levels = [{"concurrency": int(c)} for c in args.concurrency.split(",") if c]
    levels += [{"rate": float(r)} for r in args.rates.split(",") if r]
    given = env_settings(args.env)
    if args.budget_s:
        given["SOTA_SERVE_TTA_BUDGET_S"] = str(args.budget_s)
    budget = BenchConfig(server_env=given).settings("cpu").budget_s()
    if args.sweep:
        factors = [float(f) for f in args.sweep.split(",")]
        capacities, runs = sweep(model, card, images, tta=args.tta, factors=factors, seconds=args.seconds, given=given)
        capacity = capacities[args.tta]
        title = f"{card.tag}: {args.tta} requests, budget {budget:g} s"
        print(table(title, ["mode", "offered", "answered", "503", "p50 ms", "p99 ms", "p99.9 ms", "200s p99 ms",
                            "200s max ms", "degraded", "expected accuracy"], _sweep_rows(runs)))
        out = write_json({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
                          "model": card.tag, "tta": args.tta, "env": given, "budget_s": budget, "seconds": args.seconds,
                          "capacity_rps": capacity, "plain_capacity_rps": capacities["none"], "runs": runs},
                         Path(args.out))
        plot_sweep(runs, capacity, budget, title, out.with_suffix(".png"), capacities["none"])
        return 0
    runs: list[dict[str, Any]] = []
    for fallback in (False, True):
        env = {**given, "SOTA_SERVE_TTA_FALLBACK": str(fallback).lower()}
        with Server(model, env=env) as server:
            server.wait_ready()
            closed_loop(f"{server.url}/classify", images, data={"tta": args.tta}, concurrency=32, seconds=3)  # warm
            for level in levels:
                run = {"fallback": fallback, **measure(server, card, images, tta=args.tta, seconds=args.seconds,
                                                       **level)}
                runs.append(run)
                print(f"fallback {'on ' if fallback else 'off'} {run['load']}: {run['ok']}/{run['requests']} answered,"
                      f" {100 * run['degraded_share']:.1f} % degraded, p99 {run['p99_ms']:.0f} ms", file=sys.stderr)
    rows = [["on" if r["fallback"] else "off", r["load"], f"{100 * r['answered_share']:.1f} %", r["shed_503"],
             f"{100 * r['degraded_share']:.1f} %", " ".join(f"{p} {n}" for p, n in r["served"].items()),
             f"{r['throughput']:.0f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
             "n/a" if r["expected_accuracy"] is None else f"{100 * r['expected_accuracy']:.2f} %"] for r in runs]
    print(table(f"{card.tag}: every request asks for {args.tta}, latency budget {budget:g} s", ["fallback", "load", "answered", "503",
                "degraded", "served", "req/s", "p50 ms", "p99 ms", "expected accuracy"], rows))
    write_json({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(), "model": card.tag,
                "tta": args.tta, "env": given,
                "budget_s": budget, "seconds": args.seconds, "runs": runs},
               Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
