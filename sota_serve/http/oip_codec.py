"""The Open Inference Protocol's REST encoding (KServe v2, Triton HTTP): HTTP bodies to and from
the protocol's messages (sota_serve/oip/messages.py, which says what a request holds).

Pure functions; the routes are in sota_serve/http/oip.py. Tensor data travels as JSON
(``data``, flattened row-major; BYTES elements in JSON are base64, since an image file is not
UTF-8 text) or in the binary tensor extension: the JSON header is the first
``Inference-Header-Content-Length`` bytes of the body, the tensors follow in input order, each
input naming its size in ``parameters.binary_data_size``; a BYTES tensor is its elements each
preceded by a little-endian u32 length. Outputs come back binary when the output asks for
``binary_data`` or the request for ``binary_data_output`` (what ``tritonclient`` does by
default).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from sota_serve.errors import MalformedRequestError, SotaServeError
from sota_serve.oip.messages import (
    MAX_VALUES,
    OUTPUT,
    Inference,
    InferenceRequest,
    TensorInput,
    answer_parameters,
    first_error,
    only_input,
    output_tensor,
    read_inference,
)
from sota_serve.package.card import ModelCard
from sota_serve.serving.pipeline import Probabilities

HEADER_LENGTH = "inference-header-content-length"
#: The most values a JSON ``infer`` head may hold (pydantic's parser gives up the GIL nowhere).
MAX_JSON_VALUES = MAX_VALUES


#: bytes of a JSON head counted in one call (the call holds the GIL: about 0.3 ms)
_SCAN_BYTES = 1 << 20


class JsonTooLargeError(SotaServeError):
    """A JSON inference head with more values than :data:`MAX_JSON_VALUES`."""

    http_status = 413


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
        raise MalformedRequestError(f"not an inference request: {first_error(e)}") from e
    raw = _binary_part(only_input(request, card), binary)
    return read_inference(request, raw, card, max_images=max_images)


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


def encode_infer(inference: Inference, scores: Probabilities, card: ModelCard, *, name: str | None = None,
                 version: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the header length when binary);
    ``name`` and ``version``: the model's as served (default: the card's)."""
    tensor = output_tensor(inference, scores, card)
    output: dict[str, Any] = {"name": OUTPUT, "datatype": tensor.datatype, "shape": tensor.shape}
    payload = tensor.raw() if inference.binary else None
    if payload is None:
        output["data"] = tensor.data()
    else:
        output["parameters"] = {"binary_data_size": len(payload)}
    head = {"model_name": name or card.name, "model_version": version or card.version,
            "parameters": answer_parameters(scores),
            "outputs": [output]}
    if inference.id is not None:
        head["id"] = inference.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if payload is None:  # a JSON body ends in a newline, as every JSON answer does
        return header + b"\n", {"content-type": "application/json"}
    return header + payload, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
