"""The message classes and service descriptors of open_inference_grpc.proto and health.proto,
built at import from their compiled descriptors (sota_serve/grpc/compiled.py).

The descriptors are in a pool of their own: another library in the process (tritonclient's ``inference`` package)
may define the same names in protobuf's default pool.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from google.protobuf.internal import builder

from sota_serve.grpc import compiled

POOL = descriptor_pool.DescriptorPool()


INFERENCE_FILE: FileDescriptor = POOL.AddSerializedFile(compiled.OPEN_INFERENCE)
HEALTH_FILE: FileDescriptor = POOL.AddSerializedFile(compiled.HEALTH)
INFERENCE_SERVICE: ServiceDescriptor = INFERENCE_FILE.services_by_name["GRPCInferenceService"]
HEALTH_SERVICE: ServiceDescriptor = HEALTH_FILE.services_by_name["Health"]


# Each message class is built as protoc's Python output builds it (the gencode builder, which
# every *_pb2.py calls) and kept under its own name here: a message pickles as a reference to
# its class by module and name, and Ray Serve's proxy pickles the requests it hands on.
_BUILT: dict[str, Any] = {}
for _file in (INFERENCE_FILE, HEALTH_FILE):
    builder.BuildTopDescriptorsAndMessages(_file, __name__, _BUILT)
globals().update({name: value for name, value in _BUILT.items() if isinstance(value, type)})


def message(full_name: str) -> Any:
    """The class of the message named ``full_name`` (``inference.ModelInferRequest``)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


InferParameter = message("inference.InferParameter")
ModelInferRequest = message("inference.ModelInferRequest")
ModelInferResponse = message("inference.ModelInferResponse")
HealthCheckResponse = message("grpc.health.v1.HealthCheckResponse")


def empty_response(method: str) -> Any:
    """An empty response of the ``GRPCInferenceService`` call ``method``."""
    return message(INFERENCE_SERVICE.methods_by_name[method].output_type.full_name)()
