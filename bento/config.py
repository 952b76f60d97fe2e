"""What every process of the service reads once at import: settings, the plan for this
machine, and the model package, opened and checked against the settings.

All of it happens when the service module is imported, which `bentoml serve` and `bentoml
build` do before anything else: a missing model, a directory without card.json, a backend or
precision the package lacks, or any other setting it or this machine cannot serve
(:meth:`Settings.check`) stops them there with one line (:func:`settings_and_package`). The
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
from sota_serve.serving.settings import Plan, Settings, load_settings


def settings_and_package() -> tuple[Settings, Plan, ModelPackage, Any]:
    """(settings, plan, the opened package, the model as the service declares it); exits with
    one line naming the problem when any of it is wrong."""
    try:
        settings = load_settings()
        local = Path(settings.model).exists()
        package = open_package(settings.model if local else _stored(settings.model))
        check_backend(package, settings.backend)
        plan = settings.plan()
        settings.check(package, plan)
    except SotaServeError as e:
        raise SystemExit(f"sota-serve: cannot serve: {e}") from None
    # A package directory or file is served as it is; a model-store tag is declared as a
    # BentoModel, so that `bentoml build` records it in the Bento.
    model = Path(settings.model) if local else bentoml.models.BentoModel(settings.model)
    return settings, plan, package, model


def _stored(tag: str) -> str:
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
