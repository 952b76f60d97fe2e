"""Open Inference Protocol v2 (KServe v2, Triton HTTP) messages for an image classifier.

Pure functions between HTTP bodies and Python values; the routes are in sota_serve/http/oip.py.

- Inputs (exactly one per request): ``image``, BYTES ``[N]`` (or ``[N, 1]``), each element an
  encoded image file; or ``pixels``, UINT8 ``[N, 3, H, W]`` at the card's input size, crops
  already preprocessed (the model's own input: no resize, no crop, no TTA).
- Request parameter ``tta``: a TTA policy the card lists, for ``image`` (omitted: the card's
  default); ``pixels`` are single crops, so only ``none``. Request parameters
  ``tta_fallback`` (boolean), ``tta_budget_s`` (seconds) and ``tta_budget_strict`` (boolean):
  the TTA fallback ladder
  (sota_serve.serving.fallback); the response's parameters ``tta`` and ``requested_tta`` name
  the policy that ran and the one asked for.
- Output ``probabilities``, FP32 ``[N, C]``; with the output parameter ``classification: k``
  (Triton's classification extension) BYTES ``[N, k]`` strings ``"score:index:label"``, best
  first.
- Tensor data as JSON (``data``, flattened row-major; BYTES elements in JSON are base64, since
  an image file is not UTF-8 text) or in the binary tensor extension: the JSON header is the
  first ``Inference-Header-Content-Length`` bytes of the body, the tensors follow in input
  order, each input naming its size in ``parameters.binary_data_size``; a BYTES tensor is its
  elements each preceded by a little-endian u32 length. Outputs come back binary when the
  output asks for ``binary_data`` or the request for ``binary_data_output`` (what
  ``tritonclient`` does by default).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from sota_serve.errors import MalformedRequestError, SotaServeError
from sota_serve.package.card import ModelCard
from sota_serve.predictions import top_k_indices
from sota_serve.serving.fallback import FallbackAsk
from sota_serve.serving.pipeline import Probabilities

HEADER_LENGTH = "inference-header-content-length"
INPUTS = ("image", "pixels")
OUTPUT = "probabilities"
_U32 = struct.Struct("<I")
#: The most values a JSON ``infer`` head may hold. Parsing JSON numbers builds a Python object
#: per value while holding the GIL (pydantic's parser gives it up nowhere), so the head's size
#: in values bounds how long one request can hold every other client; past this the tensor
#: travels in the binary extension, as tritonclient sends it by default. 2**18 values take
#: about 10 ms to parse on a 2-core EPYC: one 224 px image as ``pixels``, 21 at 64 px.
MAX_JSON_VALUES = 2**18


#: bytes of a JSON head counted in one call (the call holds the GIL: about 0.3 ms)
_SCAN_BYTES = 1 << 20


class JsonTooLargeError(SotaServeError):
    """A JSON inference head with more values than :data:`MAX_JSON_VALUES`."""

    http_status = 413


class TensorInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


@dataclass(frozen=True)
class Inference:
    """A parsed ``infer`` request: the images or the pixels, and how to answer."""

    id: str | None
    images: list[bytes] | None
    pixels: np.ndarray | None
    tta: str | None
    classification: int  # 0: probabilities, else the top k as "score:index:label"
    binary: bool
    fallback: FallbackAsk = FallbackAsk()


def parse_infer(body: bytes, header_length: int | None, card: ModelCard, *, max_images: int) -> Inference:
    """Raises MalformedRequestError (400) with what is wrong in the user's terms."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise MalformedRequestError(f"Inference-Header-Content-Length {header_length} does not fit a"
                                    f" body of {len(body)} bytes")
    head, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    _check_json_values(head)
    try:
        request = InferenceRequest.model_validate_json(head)
    except ValidationError as e:
        raise MalformedRequestError(f"not an inference request: {_first_error(e)}") from e
    if len(request.inputs) != 1 or request.inputs[0].name not in INPUTS:
        names = [t.name for t in request.inputs]
        raise MalformedRequestError(f"send exactly one input, 'image' (BYTES, encoded files) or 'pixels'"
                                    f" (UINT8 [N, 3, {card.input.height}, {card.input.width}]); got {names}")
    tensor = request.inputs[0]
    raw = _binary_part(tensor, binary)
    tta = request.parameters.get("tta")
    if tta is not None and not isinstance(tta, str):
        raise MalformedRequestError(f"parameter tta must be a string, got {tta!r:.40}")
    images, pixels = None, None
    if tensor.name == "image":
        images = _images(tensor, raw, max_images)
    else:
        if tta not in (None, "none"):
            raise MalformedRequestError(f"tta {tta!r} needs the 'image' input: 'pixels' are already"
                                        " preprocessed single crops")
        tta = "none"
        pixels = _pixels(tensor, raw, card, max_images)
    classification, binary_out = _outputs(request, card)
    fallback = FallbackAsk.parse(request.parameters.get("tta_fallback"), request.parameters.get("tta_budget_s"),
                                 request.parameters.get("tta_budget_strict"),
                                 where="parameter ")
    return Inference(request.id, images, pixels, tta, classification, binary_out, fallback)


def _check_json_values(head: bytes) -> None:
    """Refuse a head with more JSON values than MAX_JSON_VALUES before parsing it: every value
    after the first follows a comma, and counting commas is a C scan of the bytes, whatever
    they hold (commas inside strings only make the count an over-estimate, never an under one,
    and a base64 string holds none)."""
    values = 1
    for start in range(0, len(head), _SCAN_BYTES):  # a slice at a time: the GIL is free between slices
        values += head.count(b",", start, start + _SCAN_BYTES)
        if values > MAX_JSON_VALUES:
            break
    if values > MAX_JSON_VALUES:
        raise JsonTooLargeError(
            f"the JSON inference request holds more than {MAX_JSON_VALUES} values, the most that"
            " JSON tensors may carry here; send the tensor in the binary tensor extension"
            " (parameters.binary_data_size, and the Inference-Header-Content-Length header:"
            " tritonclient's InferInput.set_data_from_numpy(..., binary_data=True), its default)")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


def _binary_part(tensor: TensorInput, binary: bytes) -> bytes | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise MalformedRequestError(f"{len(binary)} bytes after the JSON header, but input"
                                        f" {tensor.name!r} has no parameters.binary_data_size")
        if tensor.data is None:
            raise MalformedRequestError(f"input {tensor.name!r} has neither data nor binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise MalformedRequestError(f"input {tensor.name!r}: binary_data_size {size!r} but"
                                    f" {len(binary)} bytes follow the JSON header")
    return binary


def _count(tensor: TensorInput, max_images: int) -> int:
    if not tensor.shape or tensor.shape[0] < 1:
        raise MalformedRequestError(f"input {tensor.name!r}: shape {tensor.shape} has no images")
    n = tensor.shape[0]
    if n > max_images:
        raise MalformedRequestError(f"input {tensor.name!r}: {n} images, more than {max_images} in one request")
    return n


def _images(tensor: TensorInput, raw: bytes | None, max_images: int) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise MalformedRequestError(f"input 'image' must be BYTES (encoded image files), got {tensor.datatype}")
    n = _count(tensor, max_images)
    if tensor.shape not in ([n], [n, 1]):
        raise MalformedRequestError(f"input 'image' must have shape [N] or [N, 1], got {tensor.shape}")
    items = decode_bytes(raw) if raw is not None else [_base64(v, i) for i, v in enumerate(_flat(tensor.data))]
    if len(items) != n:
        raise MalformedRequestError(f"input 'image': shape says {n} images, the data holds {len(items)}")
    return items


def _base64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise MalformedRequestError(f"input 'image' element {index}: JSON BYTES must be base64 strings")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MalformedRequestError(f"input 'image' element {index} is not base64: {e}") from e


def _pixels(tensor: TensorInput, raw: bytes | None, card: ModelCard, max_images: int) -> np.ndarray:
    if tensor.datatype != "UINT8":
        raise MalformedRequestError(f"input 'pixels' must be UINT8, got {tensor.datatype}")
    n = _count(tensor, max_images)
    want = [n, 3, card.input.height, card.input.width]
    if tensor.shape != want:
        raise MalformedRequestError(f"input 'pixels' must have shape [N, 3, {card.input.height},"
                                    f" {card.input.width}] (this model's input), got {tensor.shape}")
    size = int(np.prod(want))
    if raw is not None:
        if len(raw) != size:
            raise MalformedRequestError(f"input 'pixels': {len(raw)} bytes for shape {want} ({size} bytes)")
        return np.frombuffer(raw, dtype=np.uint8).reshape(want)
    values = _flat(tensor.data)
    if len(values) != size or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                      for v in values):
        raise MalformedRequestError(f"input 'pixels': data must be {size} integers in 0..255 for shape {want}")
    return np.asarray(values, dtype=np.uint8).reshape(want)


def _flat(data: list[Any] | None) -> list[Any]:
    """Row-major elements of ``data``, which may be flat or nested (both are valid JSON tensors)."""
    out: list[Any] = []
    stack = [iter(data or [])]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _outputs(request: InferenceRequest, card: ModelCard) -> tuple[int, bool]:
    binary = request.parameters.get("binary_data_output") is True
    if not request.outputs:
        return 0, binary
    if len(request.outputs) != 1 or request.outputs[0].name != OUTPUT:
        raise MalformedRequestError(f"the only output is {OUTPUT!r}; got {[o.name for o in request.outputs]}")
    params = request.outputs[0].parameters
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= card.num_classes:
        raise MalformedRequestError(f"classification must be an integer in 0..{card.num_classes}, got {k!r:.40}")
    return k, params.get("binary_data", binary) is True


def decode_bytes(raw: bytes) -> list[bytes]:
    """A binary BYTES tensor: elements, each after its little-endian u32 length."""
    items, at = [], 0
    while at < len(raw):
        if at + _U32.size > len(raw):
            raise MalformedRequestError("binary BYTES tensor: truncated element length")
        (n,) = _U32.unpack_from(raw, at)
        at += _U32.size
        if at + n > len(raw):
            raise MalformedRequestError(f"binary BYTES tensor: element of {n} bytes overruns the body")
        items.append(raw[at : at + n])
        at += n
    return items


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(_U32.pack(len(b)) + b for b in items)


def classification(probs: np.ndarray, labels: list[str], k: int) -> list[list[str]]:
    """Triton's classification strings, best first: ``"score:index:label"`` (score as C++
    ``std::to_string`` prints a float, six decimals)."""
    return [[f"{row[i]:f}:{i}:{labels[i]}" for i in idx]
            for row, idx in zip(probs, top_k_indices(probs, k), strict=True)]


def encode_infer(inference: Inference, scores: Probabilities, card: ModelCard) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the header length when binary).

    The response's ``parameters.tta`` names the policy that ran, ``parameters.requested_tta``
    the one asked for (another when the TTA fallback ladder served a cheaper one).
    """
    probs = scores.probs
    n = len(probs)
    output: dict[str, Any] = {"name": OUTPUT}
    if inference.classification:
        strings = classification(probs, card.labels, inference.classification)
        output |= {"datatype": "BYTES", "shape": [n, inference.classification]}
        flat = [s for row in strings for s in row]
        payload = encode_bytes([s.encode() for s in flat]) if inference.binary else None
        data: list[Any] = flat
    else:
        values = np.ascontiguousarray(probs, dtype="<f4")
        output |= {"datatype": "FP32", "shape": [n, card.num_classes]}
        payload = values.tobytes() if inference.binary else None
        data = values.ravel().tolist()
    if payload is None:
        output["data"] = data
    else:
        output["parameters"] = {"binary_data_size": len(payload)}
    head = {"model_name": card.name, "model_version": card.version, "parameters": {"tta": scores.tta, "requested_tta": scores.requested_tta or scores.tta},
            "outputs": [output]}
    if inference.id is not None:
        head["id"] = inference.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if payload is None:  # a JSON body ends in a newline, as every JSON answer does
        return header + b"\n", {"content-type": "application/json"}
    return header + payload, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(card: ModelCard, platform: str) -> dict[str, Any]:
    h, w = card.input.height, card.input.width
    return {
        "name": card.name,
        "versions": [card.version],
        "platform": platform,
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, h, w]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, card.num_classes]}],
    }
