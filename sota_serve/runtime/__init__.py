"""Runtimes: one interface (:class:`Runtime`), one module per backend.

Backends are imported only when asked for, so an ONNX server never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sota_serve.errors import RuntimeBackendError
from sota_serve.runtime.base import Runtime

if TYPE_CHECKING:
    from sota_serve.package import ModelPackage

BACKENDS: tuple[str, ...] = ("onnx", "torchscript")


def load_runtime(
    package: ModelPackage,
    backend: str = "onnx",
    *,
    device: str = "auto",
    intra_op_threads: int | None = None,
) -> Runtime:
    """Open ``package``'s artifact for ``backend``; its bytes are sha256-checked first."""
    if backend not in BACKENDS:
        raise RuntimeBackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    model = package.read_artifact(backend)  # verified bytes: the exact bytes that run
    if backend == "onnx":
        from sota_serve.runtime.onnx import OnnxRuntime

        return OnnxRuntime(model, package.card, device=device, intra_op_threads=intra_op_threads)
    from sota_serve.runtime.torchscript import TorchScriptRuntime

    return TorchScriptRuntime(model, package.card, device=device, intra_op_threads=intra_op_threads)


__all__ = ["BACKENDS", "Runtime", "load_runtime"]
