"""Runtimes: one interface (:class:`Runtime`), one module per backend.

``RUNTIMES`` says which runtime runs each artifact format's bytes. A backend module is
imported only when its format is asked for, so an ONNX server never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sota_serve import formats
from sota_serve.device import resolve_device
from sota_serve.formats.onnx import ONNX
from sota_serve.formats.pt2 import PT2
from sota_serve.formats.torchscript import TORCHSCRIPT
from sota_serve.package import precision as _precision
from sota_serve.runtime.base import Runtime

if TYPE_CHECKING:
    from sota_serve.package.card import ModelCard
    from sota_serve.package.loading import ModelPackage

BACKENDS: tuple[str, ...] = formats.NAMES
log = logging.getLogger("sota_serve.runtime")
#: formats whose deprecation this process has already logged
_noted: set[str] = set()


def _onnx() -> type[Runtime]:
    from sota_serve.runtime.onnx import OnnxRuntime

    return OnnxRuntime


def _pt2() -> type[Runtime]:
    from sota_serve.runtime.pt2 import Pt2Runtime

    return Pt2Runtime


def _torchscript() -> type[Runtime]:
    from sota_serve.runtime.torchscript import TorchScriptRuntime

    return TorchScriptRuntime


#: By format name: the runtime class that runs that format's files, imported when called.
RUNTIMES: dict[str, Callable[[], type[Runtime]]] = {ONNX.name: _onnx, PT2.name: _pt2,
                                                       TORCHSCRIPT.name: _torchscript}


def open_runtime(backend: str, data: bytes, card: ModelCard, *, device: str,
                 intra_op_threads: int | None = None) -> Runtime:
    """A runtime over the verified bytes ``data`` of a ``backend`` artifact."""
    runtime_class = RUNTIMES[formats.get(backend).name]()
    return runtime_class(data, card, device=device, intra_op_threads=intra_op_threads)  # type: ignore[call-arg]


def load_runtime(
    package: ModelPackage,
    backend: str = formats.DEFAULT,
    *,
    device: str = "auto",
    intra_op_threads: int | None = None,
    precision: str = "auto",
) -> Runtime:
    """Open ``package``'s artifact for ``backend`` at ``precision`` (``auto``: fp16 on a GPU,
    int8 on a CPU, when the package has it and its agreement with fp32 holds, see
    :mod:`sota_serve.package.precision`);
    its bytes are sha256-checked first."""
    fmt = formats.get(backend)  # an unknown backend is refused before anything is read
    if fmt.deprecated and fmt.name not in _noted:  # once per process, where a user chose it
        _noted.add(fmt.name)
        log.warning(fmt.deprecated)
    resolved = resolve_device(device)
    chosen = _precision.choose(package.card, package.artifacts, backend, resolved, precision)
    model = package.read_artifact(_precision.artifact_key(backend, chosen))  # the exact bytes that run
    runtime = open_runtime(backend, model, package.card, device=resolved, intra_op_threads=intra_op_threads)
    runtime.precision = chosen
    return runtime


__all__ = ["BACKENDS", "RUNTIMES", "Runtime", "load_runtime", "open_runtime"]
