"""Open Inference Protocol v2 messages for an image classifier, as Python values: what REST
(sota_serve/http/oip_codec.py) and gRPC (sota_serve/grpc/codec.py) read from and write to
their own encodings.

- Inputs (exactly one per request): ``image``, BYTES ``[N]`` (or ``[N, 1]``), each element an
  encoded image file; or ``pixels``, UINT8 ``[N, 3, H, W]`` at the card's input size, crops
  already preprocessed (the model's own input: no resize, no crop, no TTA).
- Request parameters (InferParameters of sota_serve/contract/requests.py): ``tta``, a TTA
  policy the card lists, for ``image`` (omitted: the card's default; ``pixels`` are single
  crops, so only ``none``); ``tta_fallback`` (boolean), ``tta_budget_s`` (seconds) and
  ``tta_budget_strict`` (boolean): the TTA fallback ladder (sota_serve.serving.fallback). The
  response's parameters ``tta`` and ``requested_tta`` name the policy that ran and the one
  asked for.
- Output ``probabilities``, FP32 ``[N, C]``; with the output parameter ``classification: k``
  (OutputParameters; Triton's classification extension) BYTES ``[N, k]`` strings
  ``"score:index:label"``, best first.
- A tensor's data is either its elements (``data``: JSON values, or a gRPC request's typed
  ``contents``) or its raw bytes (the binary tensor extension, gRPC's ``raw_input_contents``):
  row-major values, a BYTES tensor being its elements each after a little-endian u32 length.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from sota_serve import __version__
from sota_serve.contract.requests import InferParameters, OutputParameters, validated
from sota_serve.errors import MalformedRequestError
from sota_serve.package.card import ModelCard
from sota_serve.predictions import top_k_indices
from sota_serve.serving.fallback import FallbackAsk
from sota_serve.serving.pipeline import Probabilities

INPUTS = ("image", "pixels")
OUTPUT = "probabilities"
#: what ``GET /v2`` and gRPC's ServerMetadata name
SERVER_NAME = "sota-serve"
EXTENSIONS = ("classification", "binary_tensor_data")
#: The most elements a request may carry as values (JSON ``data``, gRPC's typed ``contents``)
#: rather than raw bytes. Reading them builds a Python object per value while holding the GIL,
#: so this bounds how long one request can hold every other client; past it the tensor travels
#: raw (the binary tensor extension, ``raw_input_contents``), as tritonclient sends it by
#: default. 2**18 JSON values take about 10 ms to parse on a 2-core EPYC: one 224 px image as
#: ``pixels``, 21 at 64 px.
MAX_VALUES = 2**18
_U32 = struct.Struct("<I")


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
    binary: bool  # REST's binary tensor extension for the output
    fallback: FallbackAsk = FallbackAsk()


def first_error(e: ValidationError) -> str:
    """A pydantic error as one line naming the field."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


def request_of(values: dict[str, Any]) -> InferenceRequest:
    """An inference request from its fields; MalformedRequestError (400) for a missing or
    mistyped one."""
    try:
        return InferenceRequest.model_validate(values)
    except ValidationError as e:
        raise MalformedRequestError(f"not an inference request: {first_error(e)}") from e


def only_input(request: InferenceRequest, card: ModelCard) -> TensorInput:
    """The request's one input, ``image`` or ``pixels``."""
    if len(request.inputs) != 1 or request.inputs[0].name not in INPUTS:
        names = [t.name for t in request.inputs]
        raise MalformedRequestError(f"send exactly one input, 'image' (BYTES, encoded files) or 'pixels'"
                                    f" (UINT8 [N, 3, {card.input.height}, {card.input.width}]); got {names}")
    return request.inputs[0]


def read_inference(request: InferenceRequest, raw: bytes | None, card: ModelCard, *, max_images: int) -> Inference:
    """The inference a request asks for; ``raw``: its input's raw bytes, None when the input
    carries its elements in ``data``. Raises MalformedRequestError (400) with what is wrong in
    the user's terms, BadRequestError (422) for a TTA budget out of range."""
    tensor = only_input(request, card)
    parameters = validated(InferParameters, request.parameters, where="parameter ")
    tta = parameters.tta
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
    return Inference(request.id, images, pixels, tta, classification, binary_out, parameters.fallback())


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
    items = decode_bytes(raw) if raw is not None else [_element(v, i) for i, v in enumerate(_flat(tensor.data))]
    if len(items) != n:
        raise MalformedRequestError(f"input 'image': shape says {n} images, the data holds {len(items)}")
    return items


def _element(value: Any, index: int) -> bytes:
    """A BYTES element: bytes as they are (gRPC's typed contents), a string as base64 (JSON,
    where an image file cannot travel as UTF-8 text)."""
    if isinstance(value, bytes):
        return value
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
    k = validated(OutputParameters, params, num_classes=card.num_classes).classification
    return k, params.get("binary_data", binary) is True


def decode_bytes(raw: bytes) -> list[bytes]:
    """A raw BYTES tensor: elements, each after its little-endian u32 length."""
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


@dataclass(frozen=True)
class OutputTensor:
    """The answer's one output: FP32 probabilities, or BYTES classification strings."""

    datatype: str
    shape: list[int]
    #: the classification strings, row-major; None for probabilities
    strings: list[str] | None
    #: (N, C) little-endian float32; None for classification strings
    values: np.ndarray | None

    def raw(self) -> bytes:
        """The raw tensor (binary extension, gRPC's ``raw_output_contents``)."""
        if self.strings is not None:
            return encode_bytes([s.encode() for s in self.strings])
        assert self.values is not None, "an output holds strings or values"
        return self.values.tobytes()

    def data(self) -> list[Any]:
        """The flat elements (JSON ``data``)."""
        return list(self.strings) if self.strings is not None else self.values.ravel().tolist()  # type: ignore[union-attr]


def output_tensor(inference: Inference, scores: Probabilities, card: ModelCard) -> OutputTensor:
    probs = scores.probs
    n = len(probs)
    if inference.classification:
        strings = classification(probs, card.labels, inference.classification)
        return OutputTensor("BYTES", [n, inference.classification], [s for row in strings for s in row], None)
    return OutputTensor("FP32", [n, card.num_classes], None, np.ascontiguousarray(probs, dtype="<f4"))


def answer_parameters(scores: Probabilities) -> dict[str, str]:
    """The response's parameters: ``tta``, the policy that ran, and ``requested_tta``, the one
    asked for (another when the TTA fallback ladder served a cheaper one)."""
    return {"tta": scores.tta, "requested_tta": scores.requested_tta or scores.tta}


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(card: ModelCard, platform: str, *, name: str | None = None,
                   version: str | None = None) -> dict[str, Any]:
    """A model's metadata; ``name`` and ``version``: as served (default: the card's)."""
    h, w = card.input.height, card.input.width
    return {
        "name": name or card.name,
        "versions": [version or card.version],
        "platform": platform,
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, h, w]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, card.num_classes]}],
    }
