"""Which device to run on, decided without importing torch."""

from __future__ import annotations

import ctypes
import functools
from typing import Literal

from sota_serve.errors import RuntimeBackendError

Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 when there is no driver), via libcuda itself.

    onnxruntime-gpu lists the CUDA provider whether or not a GPU exists, so its provider
    list cannot answer this; asking the driver keeps CPU machines free of provider errors.
    """
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(requested: str = "auto") -> Device:
    """``auto`` -> cuda when a CUDA device is present, else cpu; ``cuda`` without one fails."""
    if requested not in DEVICES:
        raise RuntimeBackendError(f"unknown device {requested!r}; use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if cuda_device_count() > 0:
        return "cuda"
    if requested == "cuda":
        raise RuntimeBackendError(
            "device 'cuda' was asked for but no CUDA device is visible (no driver or no GPU);"
            " use device 'auto' or 'cpu'"
        )
    return "cpu"
