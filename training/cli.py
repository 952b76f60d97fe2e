"""``sota-serve train``, ``demo`` and ``export`` (registered through an entry point)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sota_serve.package.card import ModelCard

from sota_serve.errors import SotaServeError
from training.recipe import ARCHS

DEMO_NAME = "sota-demo"
DEMO_DIR = Path("packages") / DEMO_NAME


#: The exit status of a command stopped by Ctrl-C, as a shell reports it (128 + SIGINT).
INTERRUPTED = 130


class EnsembleArgumentError(SotaServeError, ValueError):
    """``train --seeds/--ensemble`` asked for something impossible."""


def _interrupted(command: str, out: Path | None, note: str = "") -> int:
    """Ctrl-C: one line instead of the traceback of wherever training was. The package is
    written into a hidden folder and moved into place once complete (training.staging), so
    the destination is as it was."""
    where = f" to {out}" if out is not None else ""
    print(f"sota-serve {command}: interrupted; nothing was written{where}{note}", file=sys.stderr, flush=True)
    return INTERRUPTED


def _logging() -> None:
    """The training commands' console: INFO lines, and not the FutureWarning that importing
    fastai raises about its own use of torch.jit.script, which a user cannot act on. Called
    at a command's start, before any thread, so the process-wide filter is safe to set."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


def _summary(card: ModelCard, out: Path) -> None:
    print(f"package: {out} ({card.tag})")
    if card.metrics:
        policies = "  ".join(f"{name} {100 * value:.2f}%" for _, name, value in card.metrics.accuracies())
        print(f"accuracy: {policies}")
        print(f"tta default: {card.tta.default}")
    if p := card.parity:
        print(f"parity: top-1 agreement {100 * p.top1_agreement:.2f}% on {p.images} images,"
              f" max |p diff| {p.max_abs_diff:.2e}")
    _precisions(card)


def _precisions(card: ModelCard) -> None:
    for variant, where in (("fp16", "GPUs"), ("int8", "CPUs")):
        if (record := card.parity_of(variant)) is not None:
            for backend in record.top1_agreement:
                verdict = f"served on {where}" if record.holds(backend) else "below the bar, not served"
                print(f"{variant} {backend}: {record.describe(backend)}; {verdict}")


def _train(args: argparse.Namespace) -> int:
    writing: list[Path | None] = [None]  # the package being written, for the Ctrl-C line
    done: list[Path] = []
    try:
        return _train_packages(args, writing, done)
    except KeyboardInterrupt:
        kept = f" ({', '.join(map(str, done))} complete)" if done else ""
        return _interrupted("train", writing[0], kept)


def _train_packages(args: argparse.Namespace, writing: list[Path | None], done: list[Path]) -> int:
    from training.pipeline import train_package
    from training.recipe import load_recipe, parse_stages

    _logging()
    overrides = {
        "data": args.data, "name": args.name, "arch": args.arch, "normalization": args.normalization,
        "seed": args.seed, "license": args.license, "label_smoothing": args.label_smoothing,
        "stages": parse_stages(args.stages) if args.stages else None,
        "mixup": args.mixup, "weights": args.weights, "freeze_epochs": args.freeze_epochs, "lr_find": True if args.lr == "find" else None,
        "fp16": True if args.fp16 else None,
        "int8": False if args.no_int8 else None,
    }
    recipe = load_recipe(preset=args.preset, path=args.recipe, overrides=overrides)
    if args.no_mixup:
        recipe = recipe.model_copy(update={"mixup": None})
    out = Path(args.out or Path("packages") / recipe.name)
    if args.seeds < 1 or (args.ensemble and args.seeds < 2):
        raise EnsembleArgumentError("--seeds must be >= 1, and >= 2 with --ensemble")
    if args.seeds == 1:
        writing[0] = out
        _summary(train_package(recipe, out), out)
        return 0
    for seed in range(recipe.seed, recipe.seed + args.seeds):  # one package per seed, beside `out`
        member = writing[0] = out.with_name(f"{out.name}-seed{seed}")
        seeded = recipe.model_copy(update={"seed": seed, "name": f"{recipe.name}-seed{seed}"})
        _summary(train_package(seeded, member), member)
        done.append(member)
    if args.ensemble:
        from training.ensemble import ensemble_packages

        writing[0] = out
        card = ensemble_packages(done, out, name=recipe.name, data=recipe.data, int8=recipe.int8,
                                 seed=recipe.seed)
        _ensemble_summary(card, out)
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    try:
        from training.ensemble import ensemble_packages

        _logging()
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        card = ensemble_packages(args.packages, args.out, weights=weights, name=args.name, data=args.data,
                                 int8=False if args.no_int8 else None)
    except KeyboardInterrupt:
        return _interrupted("ensemble", Path(args.out))
    _ensemble_summary(card, Path(args.out))
    return 0


def _ensemble_summary(card: ModelCard, out: Path) -> None:
    print(f"package: {out} ({card.tag}), {len(card.ensemble.members)} members")
    measured = card.metrics.members if card.metrics and card.metrics.members else {}
    for m in card.ensemble.members:
        own = f"{100 * measured[m.tag]:.2f}% here" if m.tag in measured else "not measured here"
        print(f"  {m.tag}  weight {m.weight:.3f}  accuracy {own}")
    if card.metrics:
        print("ensemble accuracy: " + "  ".join(f"{n} {100 * v:.2f}%" for _, n, v in card.metrics.accuracies()))
    if p := card.parity:
        print(f"parity: top-1 agreement {100 * p.top1_agreement:.2f}% with the members' weighted mean on"
              f" {p.images} images, max |p diff| {p.max_abs_diff:.2e}")
    _precisions(card)


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        from training.pipeline import train_package
        from training.recipe import load_recipe

        _logging()
        card = train_package(load_recipe(preset="digits"), out)
    except KeyboardInterrupt:
        return _interrupted("demo", out)
    _summary(card, out)
    if not args.no_import:
        from sota_serve.cli import main as sota_serve

        # Through the CLI's `import` command (the serving part's), so training never imports it.
        try:
            return sota_serve(["import", str(out), "--name", args.name])
        except KeyboardInterrupt:
            print(f"sota-serve demo: interrupted; {out} is complete but was not imported (sota-serve"
                  f" import {out} --name {args.name})", file=sys.stderr, flush=True)
            return INTERRUPTED
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        from training.convert import convert_learner

        _logging()
        card = convert_learner(args.learner, args.out, trust=args.trust, name=args.name, fp16=args.fp16,
                               calibration=args.calibration)
    except KeyboardInterrupt:
        return _interrupted("export", Path(args.out))
    _summary(card, Path(args.out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training recipe and write a model package")
    p.add_argument("--preset", choices=("imagenette", "digits"), help="start from a preset recipe")
    p.add_argument("--recipe", help="recipe TOML file (overrides the preset)")
    p.add_argument("--data", help="image folder (train/ + val/), 'digits', or imagenette[-160|-320]")
    p.add_argument("--name", help="model name in the card and the model store (default: the recipe's,"
                                  " else the data folder's name, lowercased, e.g. my-cats)")
    p.add_argument("--arch", choices=ARCHS, help="network architecture, built with random weights"
                                                 " (default: the recipe's, else xresnet18)")
    p.add_argument("--weights", help="start from this local checkpoint: a state dict (.pth/.pt), a"
                                     " .safetensors file or a sota-serve package of the same --arch")
    p.add_argument("--freeze-epochs", type=int, help="with --weights: epochs that train the head alone"
                                                       " before every layer trains (default 1)")
    p.add_argument("--lr", choices=("find",), help="find: run fastai's lr_find before each stage"
                                                   " and train at its suggestion")
    p.add_argument("--normalization", choices=("imagenet", "dataset"),
                   help="input mean/std: ImageNet's, or measured on a sample of the training images"
                        " (default: the recipe's, else imagenet; the weights' own with --weights)")
    p.add_argument("--fp16", action="store_true",
                   help="also export fp16 files, with their agreement with fp32 on the validation set")
    p.add_argument("--no-int8", action="store_true",
                   help="skip the int8 ONNX file (written by default: calibrated on training images, its"
                        " agreement with fp32 measured on the validation set; served on CPUs when it holds)")
    p.add_argument("--stages", help="progressive resizing, e.g. 128:4:64:3e-3,224:5:64:1e-3"
                                    " (size:epochs[:batch_size[:lr]])")
    p.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="MixUp alpha, e.g. 0.2 (default: the recipe's, else no MixUp)")
    p.add_argument("--no-mixup", action="store_true", help="turn off the recipe's MixUp")
    p.add_argument("--label-smoothing", type=float, metavar="EPS",
                   help="label smoothing epsilon in (0, 1) (default: the recipe's, else 0.1)")
    p.add_argument("--seed", type=int, help="seed of the run: initial weights, shuffling, augmentation,"
                                            " calibration sample (default: the recipe's, else 42)")
    p.add_argument("--license", help="the model's license (SPDX id, e.g. apache-2.0), written to the card")
    p.add_argument("--out", help="package directory (default packages/NAME)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train N packages, seeds SEED..SEED+N-1, written to OUT-seedS")
    p.add_argument("--ensemble", action="store_true", help="with --seeds: ensemble them into OUT")
    p.set_defaults(func=_train)

    p = sub.add_parser("ensemble", help="average several packages of one task into one package")
    p.add_argument("packages", nargs="+", help="member package directories (or model-store tags)")
    p.add_argument("--out", required=True, help="the ensemble's package directory")
    p.add_argument("--weights", help="one weight per member, e.g. 2,1,1 (default: equal)")
    p.add_argument("--data", help="measure the ensemble and its members on this dataset's validation"
                                  " images (image folder, 'digits', imagenette[-160|-320])")
    p.add_argument("--name", help="model name in the card (default: the first member's + -ensembleN)")
    p.add_argument("--no-int8", action="store_true",
                   help="skip the int8 ONNX file (written with --data when every member has one: calibrated"
                        " on the dataset's training images, checked on its validation images)")
    p.set_defaults(func=_ensemble)

    p = sub.add_parser("demo", help="train the digits demo, write its package, import it as sota-demo")
    p.add_argument("--out", default=str(DEMO_DIR), help=f"package directory (default: {DEMO_DIR})")
    p.add_argument("--name", default=DEMO_NAME, help="BentoML model name")
    p.add_argument("--no-import", action="store_true", help="skip the BentoML model store")
    p.set_defaults(func=_demo)

    p = sub.add_parser("export", help="convert a fastai learn.export() file to a package")
    p.add_argument("learner", help="the .pkl written by learn.export()")
    p.add_argument("--out", required=True, help="package directory to write")
    p.add_argument("--name", help="model name in the card (default: the learner file's name)")
    p.add_argument("--trust", action="store_true",
                   help="required: the file is a pickle and loading it runs its code")
    p.add_argument("--fp16", action="store_true",
                   help="also export fp16 files (their agreement with fp32 is measured on the export check's images)")
    p.add_argument("--calibration", metavar="DIR",
                   help="also export an int8 ONNX file, its activation ranges set on up to 256 images"
                        " under DIR (like the training images; agreement measured on the export check's images)")
    p.set_defaults(func=_export)
