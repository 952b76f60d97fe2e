"""``sota-serve import`` (registered through an entry point)."""

from __future__ import annotations

import argparse


def _import(args: argparse.Namespace) -> int:
    from bento.store import import_package

    formats = args.formats.split(",") if args.formats else None
    model = import_package(args.package, name=args.name, formats=formats)
    print(f"imported into the BentoML model store as {model.tag}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="add a package to the BentoML model store")
    p.add_argument("package", help="package directory")
    p.add_argument("--name", help="model name in the store (default: the card's name)")
    p.add_argument("--formats", help="comma list of the artifacts to keep, e.g. onnx (default: all);"
                                     " a Bento built on the model carries only these")
    p.set_defaults(func=_import)
