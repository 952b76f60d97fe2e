"""``python -m bench`` (``sota-serve bench`` runs it from a clone of the repository)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sota_serve.package.precision import CHOICES


def _bench(args: argparse.Namespace) -> int:
    from bench.report import render, write
    from bench.run import BenchConfig, run
    from bench.server import env_settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    common = {"out": Path(args.out), "naive": not args.no_naive, "litserve": not args.no_litserve,
              "http": not args.no_http, "jpeg_draft": args.jpeg_draft, "images": args.images,
              "processes": args.processes, "decode": args.decode, "precision": args.precision,
              "server_env": env_settings(args.env)}
    cfg = BenchConfig.quick_mode(**common) if args.quick else BenchConfig(**common)
    if args.models:
        cfg.models = tuple(args.models.split(","))
    if args.concurrency:
        cfg.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    if args.seconds:
        cfg.seconds = args.seconds
    if args.tta:
        cfg.policies = tuple(args.tta.split(","))
    if args.litserve_workers:
        cfg.litserve_workers = tuple(int(w) for w in args.litserve_workers.split(","))
    results = run(cfg)
    print(render(results))
    stem = args.name or ("quick" if args.quick else f"bench-{results['machine']['device']}")
    write(results, cfg.out, stem)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="seconds, tiny model (what CI runs)")
    p.add_argument("--models", help="comma list: xresnet50, demo, tiny, or package dirs")
    p.add_argument("--concurrency", help="comma list, e.g. 1,4,16,64")
    p.add_argument("--seconds", type=float, help="seconds per load level")
    p.add_argument("--tta", help="comma list of TTA policies to measure (default none,five_crop;"
                                 " none,flip,five_crop,ten_crop for all)")
    p.add_argument("--out", default="bench/results", help="folder the results go to (a JSON file, and a plot when matplotlib is installed)")
    p.add_argument("--name", help="file stem of the results (default: bench-<device>)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive BentoML peer")
    p.add_argument("--no-litserve", action="store_true", help="skip the LitServe peer")
    p.add_argument("--litserve-workers", help="comma list of LitServe workers_per_device to try (default:"
                                              " 1 and one per core on a CPU, 1 and 4 on a GPU); ratios use the best")
    p.add_argument("--images", default="imagenet", choices=("imagenet", "mix"),
                   help="imagenet: 400-640 px JPEGs (~55 KB); mix: 300-4000 px photos")
    p.add_argument("--processes", type=int, help="load-generator processes (default: one per 4 cores)")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurements")
    p.add_argument("--jpeg-draft", action="store_true", help="decode large JPEGs at reduced scale")
    p.add_argument("--decode", default="pillow", choices=("pillow", "torchvision"),
                   help="where uploads are decoded (SOTA_SERVE_DECODE)")
    p.add_argument("--precision", default="auto", choices=CHOICES,
                   help="the model file served, offline and by LitServe too (SOTA_SERVE_PRECISION);"
                        " auto: fp16 on a GPU, int8 on a CPU, when the card's agreement record holds")
    p.add_argument("--env", action="append", default=[], metavar="SOTA_SERVE_X=V",
                   help="a setting for the served model (repeatable), e.g. SOTA_SERVE_WORKERS=16")


def main_args(argv: list[str] | None = None) -> int:
    """``python -m bench ARGS``."""
    parser = argparse.ArgumentParser(prog="sota-serve bench", description="sota-serve benchmarks")
    add_arguments(parser)
    return _bench(parser.parse_args(argv))
