"""Runtimes: one interface (:class:`Runtime`), one module per backend.

Which runtime opens which file is the artifact format's business (:mod:`sota_serve.formats`);
backends are imported only when asked for, so an ONNX server never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sota_serve import formats
from sota_serve import precision as _precision
from sota_serve.device import resolve_device
from sota_serve.runtime.base import Runtime

if TYPE_CHECKING:
    from sota_serve.package import ModelPackage

BACKENDS: tuple[str, ...] = formats.NAMES


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
    :mod:`sota_serve.precision`);
    its bytes are sha256-checked first."""
    fmt = formats.get(backend)
    resolved = resolve_device(device)
    chosen = _precision.choose(package.card, package.artifacts, backend, resolved, precision)
    model = package.read_artifact(_precision.artifact_key(backend, chosen))  # the exact bytes that run
    runtime = fmt.open_runtime(model, package.card, device=resolved, intra_op_threads=intra_op_threads)
    runtime.precision = chosen
    return runtime


__all__ = ["BACKENDS", "Runtime", "load_runtime"]
