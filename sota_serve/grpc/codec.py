"""ModelInfer's protocol buffers to and from the protocol's messages (sota_serve/oip/messages.py,
which REST reads and writes too).

An input's elements come in ``raw_input_contents`` (one raw tensor per input, in input order:
what tritonclient.grpc sends) or in its typed ``contents`` (the repeated field of its
datatype). Parameters of every kind (bool, int64, string, double, uint64) are their values.
The answer's tensor travels in ``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from sota_serve.errors import MalformedRequestError, SotaServeError
from sota_serve.grpc.protos import ModelInferResponse
from sota_serve.oip.messages import (
    MAX_VALUES,
    OUTPUT,
    Inference,
    answer_parameters,
    only_input,
    output_tensor,
    read_inference,
    request_of,
)
from sota_serve.package.card import ModelCard
from sota_serve.serving.pipeline import Probabilities

#: the typed contents field of each datatype
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class TooManyValuesError(SotaServeError):
    """Typed contents with more elements than :data:`MAX_VALUES`."""

    http_status = 413


def parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values (a parameter with none set is left out)."""
    return {name: getattr(p, kind) for name, p in values.items() if (kind := p.WhichOneof("parameter_choice"))}


def read_infer(request: Any, card: ModelCard, *, max_images: int) -> Inference:
    """The inference a ModelInferRequest asks for; raises what
    :func:`~sota_serve.oip.messages.read_inference` raises, and MalformedRequestError (400) for
    raw contents that do not pair with the inputs."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise MalformedRequestError(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)}"
                                    " inputs; send one per input, in input order")
    message = request_of({
        "id": request.id or None,
        "parameters": parameters(request.parameters),
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                    "parameters": parameters(t.parameters), "data": None if raw else _contents(t)}
                   for t in request.inputs],
        "outputs": [{"name": o.name, "parameters": parameters(o.parameters)} for o in request.outputs] or None,
    })
    tensor = only_input(message, card)
    if not raw and tensor.data is None and tensor.datatype in CONTENTS:
        raise MalformedRequestError(f"input {tensor.name!r} has neither contents.{CONTENTS[tensor.datatype]}"
                                    " nor raw_input_contents")
    return read_inference(message, raw[0] if raw else None, card, max_images=max_images)


def _contents(tensor: Any) -> list[Any] | None:
    """The typed elements of ``tensor`` for its datatype, None when it has none."""
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        return None
    values = getattr(tensor.contents, field)
    if len(values) > MAX_VALUES:
        raise TooManyValuesError(
            f"input {tensor.name!r} holds more than {MAX_VALUES} values in contents.{field}, the most"
            " that typed contents may carry here; send the tensor in raw_input_contents"
            " (tritonclient.grpc's InferInput.set_data_from_numpy does)")
    return list(values) or None


def infer_response(inference: Inference, scores: Probabilities, card: ModelCard, *, name: str | None = None,
                   version: str | None = None) -> Any:
    """The ModelInferResponse of ``scores``; ``name`` and ``version``: the model's as served
    (default: the card's)."""
    tensor = output_tensor(inference, scores, card)
    response = ModelInferResponse(model_name=name or card.name, model_version=version or card.version,
                                  id=inference.id or "")
    response.outputs.add(name=OUTPUT, datatype=tensor.datatype, shape=tensor.shape)
    for name, value in answer_parameters(scores).items():
        response.parameters[name].string_param = value
    response.raw_output_contents.append(tensor.raw())
    return response


def from_dict(values: dict[str, Any], kind: type) -> Any:
    """The message ``kind`` holding ``values``, a REST answer's JSON (the same field names)."""
    return json_format.ParseDict(values, kind())
