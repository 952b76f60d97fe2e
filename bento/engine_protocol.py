"""The bytes between the API workers and the engine process (bento/engine.py).

A request is the uploads themselves, a response the probabilities as float32: no pickling,
nothing decoded twice. Both start with a little-endian u32 length and a JSON header.

- request header: ``{"tta", "k", "sizes": [bytes per image], "timeout_s"}``, then the images;
  or, for already-preprocessed crops, ``{"tta": "none", "k": 1, "pixels": [N, 3, H, W],
  "timeout_s"}``, then the uint8 crops;
- response header: ``{"classes", "ok": [indices], "ood": [OOD check | null per ok image],
  "errors": {index: [type, message]}, "overloaded": message | null, "retry_after_s",
  "seconds_per_crop"}``, then an (len(ok), classes) float32 array.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bento.pipeline import Scored
from sota_serve.errors import (
    ImageError,
    ImageGeometryError,
    ImageTooLargeError,
    InvalidImageError,
    MalformedRequestError,
    OverloadedError,
    UnsupportedImageFormatError,
)
from sota_serve.predictions import OODResult

_ERRORS: dict[str, type[ImageError]] = {cls.__name__: cls for cls in (
    ImageError, InvalidImageError, UnsupportedImageFormatError, ImageGeometryError, ImageTooLargeError)}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class EngineRequest:
    images: list[bytes]
    tta: str
    k: int
    timeout_s: float
    pixels: np.ndarray | None = None  # instead of images: (N, 3, H, W) uint8 crops


def _frame(header: dict, payload: bytes | memoryview) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_LENGTH.pack(len(head)), head, payload])


def _unframe(body: bytes) -> tuple[dict, memoryview]:
    try:
        (n,) = _LENGTH.unpack_from(body)
        header = json.loads(body[_LENGTH.size : _LENGTH.size + n])
    except (struct.error, ValueError) as e:
        raise MalformedRequestError(f"not an engine message: {e}") from e
    return header, memoryview(body)[_LENGTH.size + n :]


def encode_request(images: Sequence[bytes], tta: str, k: int, timeout_s: float) -> bytes:
    header = {"tta": tta, "k": k, "sizes": [len(b) for b in images], "timeout_s": timeout_s}
    return _frame(header, b"".join(images))


def encode_pixels_request(pixels: np.ndarray, timeout_s: float) -> bytes:
    header = {"tta": "none", "k": 1, "pixels": list(pixels.shape), "timeout_s": timeout_s}
    return _frame(header, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())


def decode_request(body: bytes) -> EngineRequest:
    header, payload = _unframe(body)
    if "pixels" in header:
        shape = tuple(int(n) for n in header["pixels"])
        if len(shape) != 4 or int(np.prod(shape)) != len(payload):
            raise MalformedRequestError(f"engine request: {len(payload)} bytes for pixels {shape}")
        pixels = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
        return EngineRequest([], "none", 1, float(header["timeout_s"]), pixels)
    images, at = [], 0
    for size in header["sizes"]:
        images.append(bytes(payload[at : at + size]))
        at += size
    if at != len(payload):
        raise MalformedRequestError(f"engine request: {len(payload)} payload bytes, sizes add up to {at}")
    return EngineRequest(images, header["tta"], int(header["k"]), float(header["timeout_s"]))


def encode_response(results: Sequence[Scored | ImageError] | None, classes: int, *,
                    seconds_per_crop: float, overloaded: OverloadedError | None = None) -> bytes:
    results = results or []
    scored = [(i, r) for i, r in enumerate(results) if isinstance(r, Scored)]
    ok = [i for i, _ in scored]
    errors = {str(i): [type(r).__name__, str(r)] for i, r in enumerate(results) if isinstance(r, ImageError)}
    probs = (np.stack([r.probs for _, r in scored]).astype(np.float32) if scored
             else np.zeros((0, classes), np.float32))
    ood = [r.ood.model_dump() if r.ood else None for _, r in scored]
    header = {"classes": classes, "ok": ok, "ood": ood, "errors": errors, "seconds_per_crop": seconds_per_crop,
              "overloaded": str(overloaded) if overloaded else None,
              "retry_after_s": overloaded.retry_after_s if overloaded else 0}
    return _frame(header, probs.tobytes())


def decode_response(body: bytes) -> tuple[list[Scored | ImageError], float]:
    """(one entry per image, the engine's seconds per crop); raises OverloadedError."""
    header, payload = _unframe(body)
    if header["overloaded"]:
        raise OverloadedError(header["overloaded"], retry_after_s=header["retry_after_s"])
    ok, errors = header["ok"], header["errors"]
    probs = np.frombuffer(payload, dtype=np.float32).reshape(len(ok), header["classes"])
    ood = header["ood"]
    out: list[Scored | ImageError] = [None] * (len(ok) + len(errors))  # type: ignore[list-item]
    for row, (i, check) in enumerate(zip(ok, ood, strict=True)):
        out[i] = Scored(probs[row], OODResult(**check) if check else None)
    for i, (kind, message) in errors.items():
        out[int(i)] = _ERRORS.get(kind, ImageError)(message)
    return out, float(header["seconds_per_crop"])
