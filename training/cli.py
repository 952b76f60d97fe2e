"""``sota-serve train``, ``demo`` and ``export`` (registered through an entry point)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

DEMO_NAME = "sota-demo"
DEMO_DIR = Path("packages") / DEMO_NAME


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _summary(card, out: Path) -> None:
    data = card.to_dict()
    m, p = data.get("metrics", {}), data.get("parity", {})
    print(f"package: {out} ({card.tag})")
    if m:
        policies = "  ".join(f"{name} {100 * m[key]:.2f}%" for key, name in (
            ("accuracy", "plain"), ("accuracy_flip", "flip"), ("accuracy_five_crop", "five-crop"),
            ("accuracy_ten_crop", "ten-crop"), ("accuracy_fastai_tta", "fastai TTA")) if key in m)
        print(f"accuracy: {policies}")
        print(f"tta default: {card.tta.default}")
    if p:
        print(f"parity: top-1 agreement {100 * p['top1_agreement']:.2f}% on {p['images']} images,"
              f" max |p diff| {p['max_abs_diff']:.2e}")


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import train_package
    from training.recipe import load_recipe, parse_stages

    _logging()
    overrides = {
        "data": args.data, "name": args.name, "arch": args.arch, "normalization": args.normalization,
        "seed": args.seed, "license": args.license, "label_smoothing": args.label_smoothing,
        "stages": parse_stages(args.stages) if args.stages else None,
        "mixup": args.mixup,
    }
    recipe = load_recipe(preset=args.preset, path=args.recipe, overrides=overrides)
    if args.no_mixup:
        recipe = recipe.model_copy(update={"mixup": None})
    out = Path(args.out or Path("packages") / recipe.name)
    card = train_package(recipe, out)
    _summary(card, out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from training.pipeline import train_package
    from training.recipe import load_recipe

    _logging()
    out = Path(args.out)
    card = train_package(load_recipe(preset="digits"), out)
    _summary(card, out)
    if not args.no_import:
        from sota_serve.cli import main as sota_serve

        # Through the CLI's `import` command (the serving part's), so training never imports it.
        return sota_serve(["import", str(out), "--name", args.name])
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.convert import convert_learner

    _logging()
    card = convert_learner(args.learner, args.out, trust=args.trust, name=args.name)
    _summary(card, Path(args.out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training recipe and write a model package")
    p.add_argument("--preset", choices=("imagenette", "digits"), help="start from a preset recipe")
    p.add_argument("--recipe", help="recipe TOML file (overrides the preset)")
    p.add_argument("--data", help="image folder (train/ + val/), 'digits', or imagenette[-160|-320]")
    p.add_argument("--name", help="model name in the card")
    p.add_argument("--arch", choices=("xresnet18", "xresnet34", "xresnet50"))
    p.add_argument("--normalization", choices=("imagenet", "dataset"))
    p.add_argument("--stages", help="progressive resizing, e.g. 128:4:64:3e-3,224:5:64:1e-3"
                                    " (size:epochs[:batch_size[:lr]])")
    p.add_argument("--mixup", type=float, help="MixUp alpha")
    p.add_argument("--no-mixup", action="store_true")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--license", help="the model's license (SPDX id, e.g. apache-2.0), written to the card")
    p.add_argument("--out", help="package directory (default packages/NAME)")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="train the digits demo, write its package, import it as sota-demo")
    p.add_argument("--out", default=str(DEMO_DIR))
    p.add_argument("--name", default=DEMO_NAME, help="BentoML model name")
    p.add_argument("--no-import", action="store_true", help="skip the BentoML model store")
    p.set_defaults(func=_demo)

    p = sub.add_parser("export", help="convert a fastai learn.export() file to a package")
    p.add_argument("learner", help="the .pkl written by learn.export()")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--trust", action="store_true",
                   help="required: the file is a pickle and loading it runs its code")
    p.set_defaults(func=_export)
