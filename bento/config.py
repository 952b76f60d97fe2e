"""What every process of the service reads once at import: settings, the plan for this
machine, and the model packages, opened and checked against the settings.

All of it happens when the service module is imported, which `bentoml serve` and `bentoml
build` do before anything else: a missing model, a directory without card.json, a backend or
precision a package lacks, or any other setting it or this machine cannot serve
(:meth:`Settings.check`) stops them there with one line (:func:`settings_and_models`). The
same failure in the service's ``__init__`` would restart the worker forever.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import bentoml

from sota_serve.errors import SotaServeError
from sota_serve.package.loading import ModelPackage, check_backend, open_package
from sota_serve.package.repository import Entry, scan
from sota_serve.serving.settings import Plan, Settings, load_settings


def settings_and_models() -> tuple[Settings, Plan, list[Entry], list[Any]]:
    """(settings, plan, the models to serve, each as the service declares it); exits with one
    line naming the problem when any of it is wrong."""
    try:
        settings = load_settings()
        plan = settings.plan()
        entries = scan(settings.model, resolve=stored)
        for entry in entries:
            checked_package(entry, settings, plan)
        if settings.default_model is not None and settings.default_model not in {e.name for e in entries}:
            raise SotaServeError(f"SOTA_SERVE_DEFAULT_MODEL={settings.default_model}: no such model among"
                                 f" {', '.join(e.name for e in entries)}")
    except SotaServeError as e:
        raise SystemExit(f"sota-serve: cannot serve: {e}") from None
    # A package directory or file is served as it is; a model-store tag is declared as a
    # BentoModel, so that `bentoml build` records it in the Bento.
    tags = [item.strip() for item in settings.model.split(",") if item.strip() and not Path(item.strip()).exists()]
    declared = [bentoml.models.BentoModel(tag) for tag in tags] or [Path(settings.model.split(",")[0].strip())]
    return settings, plan, entries, declared


def declare_models(service: type, declared: list[Any]) -> None:
    """Each model-store tag the service serves as a class attribute, which BentoML collects,
    so that `bentoml build` records it in the Bento; a package directory is served as it is."""
    for i, model in enumerate(declared):
        setattr(service, "model" if i == 0 else f"model_{i}", model)


def checked_package(entry: Entry, settings: Settings, plan: Plan) -> ModelPackage:
    """``entry``'s package, opened (sha256 checked) and checked against the settings."""
    package = open_package(entry.source)
    check_backend(package, settings.backend)
    settings.check(package, plan)
    return package


def stored(tag: str) -> str:
    """A model-store tag as the directory BentoML keeps it in: in a Bento (its container
    included) that is the Bento's own store, which BentoML makes current while it imports the
    service, not ``$BENTOML_HOME/models``. A tag BentoML does not know is handed on as it is,
    for :func:`open_package` to refuse with its one line."""
    try:
        return bentoml.models.get(tag).path
    except (bentoml.exceptions.BentoMLException, ValueError):
        return tag


def explain_port_in_use() -> None:
    """Have this process end with one line naming the port, instead of a traceback, when the
    port `bentoml serve` binds is taken (it binds after importing the service, in the same
    process). Python's documented hook for uncaught exceptions; anything else goes on to the
    hook that was there."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            port = _cli_port(sys.argv)
            print(f"sota-serve: port {port} is in use by another program; stop it, or serve on"
                  f" another port: bentoml serve --port {int(port) + 1 if port.isdigit() else 'N'}",
                  file=sys.stderr)
            return
        previous(kind, error, tb)

    sys.excepthook = hook


def _cli_port(argv: list[str]) -> str:
    """The ``--port`` (``-p``) of the command line, else BentoML's default, 3000."""
    for i, arg in enumerate(argv):
        if arg in ("--port", "-p") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--port="):
            return arg.partition("=")[2]
    return "3000"
