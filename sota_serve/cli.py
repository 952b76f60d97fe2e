"""``sota-serve``: the command line.

Core commands (``inspect``, ``predict``) live here. Other parts of the project add theirs
through the ``sota_serve.commands`` entry-point group (``training`` adds ``train``, ``demo``
and ``export``; ``bento`` adds ``import``), so this package never imports them and a
serving-only install keeps a working CLI. ``bench`` runs the benchmark of a clone of the
repository as a program of its own (``python -m bench``): it is not part of the installed
package (docs/benchmarking.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from sota_serve import __version__, formats
from sota_serve.constants import IMAGE_SUFFIXES
from sota_serve.errors import ImageError, SotaServeError
from sota_serve.explain import cli as explain_cli
from sota_serve.package import precision
from sota_serve.tta import CROPS_PER_IMAGE, DESCRIPTIONS, POLICIES

if TYPE_CHECKING:
    from sota_serve.package.card import ModelCard

ENTRY_POINT_GROUP = "sota_serve.commands"


def _inspect(args: argparse.Namespace) -> int:
    from sota_serve.package.loading import open_package

    package = open_package(args.path)
    card = package.card
    if args.json:
        print(card.to_json())
        return 0
    norm, pre, inp = card.normalization, card.preprocess, card.input
    rows = [
        ("model", card.tag),
        ("source", f"{package.source} ({'sha256 verified' if package.verified else 'lone file, embedded card'})"),
        ("formats", ", ".join(f"{b} ({', '.join(package.precisions(b))})" for b in package.backends)),
        ("labels", f"{card.num_classes}: {', '.join(card.labels[:20])}{' ...' if card.num_classes > 20 else ''}"),
        ("input", f"{inp.width}x{inp.height} {inp.channels} {inp.dtype} {inp.layout}"),
        ("preprocess", f"exif_transpose={pre.exif_transpose}, resize shortest edge {pre.resize_shortest_edge}"
                       f" ({pre.interpolation}), {pre.crop} crop {inp.width}x{inp.height}"),
        ("normalization", f"mean={list(norm.mean)} std={list(norm.std)} pixel_scale={norm.pixel_scale:g}"
                          f" in_graph={norm.in_graph}"),
        ("output", card.output),
        ("tta", f"default {card.tta.default}; policies {', '.join(card.tta.policies())}"),
        *tta_rows(card),
        *ensemble_rows(card),
    ]
    if card.metrics and (headline := card.metrics.headline()):
        rows.append(("accuracy", "  ".join(f"{k}={100 * v:.2f}%" for k, v in headline.items())))
    if parity := card.parity:
        rows.append(("parity", f"top-1 agreement {100 * parity.top1_agreement:.2f}% on"
                               f" {parity.images} images, max |p diff| {parity.max_abs_diff:.2e}"))
    for variant, device in (("fp16", "GPU"), ("int8", "CPU")):
        if record := card.parity_of(variant):
            for backend in record.top1_agreement:
                verdict = f"serves on {device} (auto)" if record.holds(backend) else "below the bar: fp32 serves"
                rows.append((f"{variant} {backend}", f"{record.describe(backend)}; {verdict}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def tta_rows(card: ModelCard) -> list[tuple[str, str]]:
    """One row per TTA policy of the card: its cost, resize edge and measured accuracy."""
    rows = []
    edges = {"none": card.preprocess.resize_shortest_edge, **card.tta.edges()}
    for policy, edge in edges.items():
        k = CROPS_PER_IMAGE[policy]
        cells = [f"{k} model call{'s' if k > 1 else ''}/image", f"resize {edge}"]
        m = card.metrics.policy(policy) if card.metrics else None
        if m is not None and m.accuracy is not None:
            cells.append(f"accuracy {100 * m.accuracy:.2f}%")
        if m is not None and m.accuracy_held_out is not None:
            cells.append(f"held-out {100 * m.accuracy_held_out:.2f}%")
        rows.append((f"tta {policy}", ", ".join(cells)))
    return rows


def ensemble_rows(card: ModelCard) -> list[tuple[str, str]]:
    if card.ensemble is None:
        return []
    measured = (card.metrics.members if card.metrics else None) or {}
    rows = []
    for i, m in enumerate(card.ensemble.members):
        cells = [m.tag, f"weight {m.weight:.3f}"]
        if m.tag in measured:
            cells.append(f"accuracy {100 * measured[m.tag]:.2f}% on the ensemble's validation images")
        elif m.accuracy is not None:
            cells.append(f"accuracy {100 * m.accuracy:.2f}% (its own card)")
        rows.append((f"member {i + 1}", ", ".join(cells)))
    return rows


def _predict(args: argparse.Namespace) -> int:
    from sota_serve.classifier import Classifier

    clf = Classifier.open(args.package, backend=args.backend, device=args.device, jpeg_draft=args.jpeg_draft,
                          precision=args.precision)
    names = image_paths(args.images)
    images: list[bytes] = []
    for name in names:
        try:
            images.append(Path(name).read_bytes())
        except OSError as e:
            raise SotaServeError(f"cannot read {name}: {e.strerror}") from e
    results = clf.classify(images, tta=args.tta, top_k=args.top_k)
    failed = 0
    out = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, ImageError):
            failed += 1
            out.append({"image": name, "error": str(result)})
        else:
            out.append({"image": name, **result.model_dump(exclude_none=True)})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for entry in out:
            print(entry["image"])
            if "error" in entry:
                print(f"  error: {entry['error']}")
                continue
            for p in entry["predictions"]:
                print(f"  {p['score']:.4f}  {p['label']}")
            ood = entry.get("ood")
            if ood and ood["out_of_distribution"]:
                print(f"  out of distribution: unlike the training images (distance {ood['distance']:.1f}"
                      f" > {ood['threshold']:.1f}); the scores above are not backed by the validation accuracy")
    return 1 if failed else 0


def image_paths(names: Sequence[str]) -> list[str]:
    """``names`` with each folder replaced by its image files (by suffix: JPEG, PNG, WebP, BMP,
    GIF, TIFF), subfolders included, sorted; a file named is kept whatever it is, for the
    decoder to judge."""
    paths: list[str] = []
    for name in names:
        folder = Path(name)
        if not folder.is_dir():
            paths.append(name)
            continue
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SotaServeError(f"{name}: a folder with no image files in it (JPEG, PNG, WebP, BMP, GIF, TIFF)")
        paths += [str(p) for p in files]
    return paths


def _quantize(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from sota_serve.building.calibration import image_files
    from sota_serve.building.quantize import Int8ExistsError, add_int8
    from sota_serve.package.loading import store_model_dir

    def quantized(path: Path | str) -> None:
        try:
            _quantized(add_int8(path, files, seed=args.seed, overwrite=args.overwrite), args.package)
        except Int8ExistsError as e:  # said with this command's flag and the package as given
            raise e.told(args.package, "pass --overwrite") from None

    files = image_files(args.calibration)
    stored = None if Path(args.package).exists() else store_model_dir(args.package)
    if stored is None:
        quantized(args.package)
        return 0
    # A store entry is never changed (a Bento built on its tag keeps its bytes): quantize a
    # copy and import that as a new version of the same model.
    name = args.package.partition(":")[0]
    with tempfile.TemporaryDirectory(prefix="sota-serve-quantize-") as tmp:
        copy = Path(tmp) / name
        shutil.copytree(stored, copy, ignore=shutil.ignore_patterns(STORE_RECORD))
        quantized(copy)
        print(f"{args.package} ({name}:{stored.name}) is left as it is; the int8 file goes into a new version")
        return main(["import", str(copy), "--name", name])


#: BentoML's own record in a stored model's directory; it writes a new one for a new version.
STORE_RECORD = "model.yaml"


def _quantized(card: ModelCard, package: str) -> None:
    record = card.int8
    assert record is not None
    for backend in record.top1_agreement:
        verdict = "auto serves it on CPUs" if record.holds(backend) else "below the bar: auto keeps fp32"
        print(f"{package}: wrote {card.artifacts[f'{backend}-int8'].path}; {record.describe(backend)}; {verdict}")


#: what ``sota-serve bench`` imports beyond the core: the ``bench`` extra (pyproject.toml)
BENCH_MODULES = ("bentoml", "httpx", "httptools", "litserve")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # sys.modules holds None for it: importing it fails
        return False


def _bench(args: argparse.Namespace) -> int:
    """Run ``python -m bench`` of the clone this package comes from, with the arguments given.

    A missing extra is said at once, in one line, rather than by a peer process that fails
    after the benchmark has built its models.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__main__.py").is_file():
        raise SotaServeError("the benchmark is not part of the installed package; it runs from a clone"
                             " of the repository, installed there with pip install -e '.[bench]'")
    for name in BENCH_MODULES:
        if not _importable(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))}
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args], env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sota-serve", description="Package and serve fastai image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"sota-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the card of a package dir, .onnx, .pt2 or .pt file, or store tag")
    p.add_argument("path", help="package directory, .onnx, .pt2 or .pt file, or BentoML model-store tag (name[:version])")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("predict", help="classify image files with a package",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("package", help="package directory, .onnx, .pt2 or .pt file, or BentoML model-store tag"
                                   " (name[:version], e.g. sota-demo:latest)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF), or folders: their image files,"
                        " subfolders included, in sorted order")
    p.add_argument("--backend", choices=formats.NAMES, default=formats.DEFAULT, help="which exported file runs")
    p.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="fp32, fp16 or int8 (the package's file of that precision), or auto: fp16 on a"
                        " GPU, int8 on a CPU, when the card's agreement record for it holds")
    p.add_argument("--tta", choices=POLICIES, default=None,
                   help="test-time augmentation: " + "; ".join(f"{p}: {DESCRIPTIONS[p]}" for p in POLICIES)
                        + " (default: %(default)s, which means the policy the card names in tta.default)")
    p.add_argument("--top-k", type=int, default=5, help="labels to print per image")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when a device is present")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at reduced scale (faster, pixels differ slightly)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one entry per image")
    p.set_defaults(func=_predict)

    explain_cli.register(sub)

    p = sub.add_parser("quantize", help="add an int8 ONNX file to a package (faster on CPUs), calibrated on"
                                        " your images, with its agreement with fp32 in the card")
    p.add_argument("package", help="package directory (its files are verified and left as they are), or"
                                   " BentoML model-store tag: the stored version is left as it is and the"
                                   " package with its int8 file is imported as a new version")
    p.add_argument("--calibration", required=True, metavar="DIR",
                   help="images like the training ones (e.g. the training folder): up to 256 set the int8"
                        " ranges, up to 256 others measure the agreement with fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of the split of the images")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the package's int8 file when it has one (kept otherwise)")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("bench", add_help=False,
                       help="benchmark the model, the offline pipeline and the HTTP service against LitServe"
                            " (from a clone of the repository; sota-serve bench --help)")
    p.set_defaults(func=_bench, bench_args=[])

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices:  # the metadata of an install older than the core command
            continue
        try:
            register = ep.load()
        except ImportError as e:  # e.g. a serving-only install without the training extras
            print(f"sota-serve: commands from {ep.value} unavailable: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


#: top-level package a command may need -> the install extra that provides it (pyproject.toml)
EXTRAS = {"torch": "torchscript", "torchvision": "torchscript", "fastai": "train", "sklearn": "train",
          "matplotlib": "train", "bentoml": "serve", "litserve": "bench", "httpx": "bench",
          "httptools": "bench"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # argparse alone would say a COMMAND is missing but not which there are
        parser.print_help(sys.stderr)
        print(f"{parser.prog}: error: a COMMAND is required", file=sys.stderr)
        return 2  # argparse's status for a command line it cannot run
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # its options are the benchmark's own (python -m bench --help)
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except SotaServeError as e:
        print(f"sota-serve: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        if args.command in ("train", "demo", "export"):
            extra = "train"  # torch alone would not do
        elif args.command == "bench":
            extra = "bench"  # the serve extra alone would not do
        print(f"sota-serve {args.command}: needs {e.name}, which this install lacks;"
              f" install the `{extra}` extra: pip install 'sota-serve[{extra}]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sota-serve inspect ... | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
