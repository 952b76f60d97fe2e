"""Runtimes: one interface (:class:`Runtime`), one module per backend.

Which runtime opens which file is the artifact format's business (:mod:`sota_serve.formats`);
backends are imported only when asked for, so an ONNX server never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sota_serve import formats
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
) -> Runtime:
    """Open ``package``'s artifact for ``backend``; its bytes are sha256-checked first."""
    fmt = formats.get(backend)
    model = package.read_artifact(backend)  # verified bytes: the exact bytes that run
    return fmt.open_runtime(model, package.card, device=device, intra_op_threads=intra_op_threads)


__all__ = ["BACKENDS", "Runtime", "load_runtime"]
