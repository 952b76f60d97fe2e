"""The message classes and service descriptors of open_inference_grpc.proto and health.proto,
built at import from their compiled descriptors (sota_serve/grpc/compiled.py).

In a pool of their own: another library in the process (tritonclient's ``inference`` package)
may define the same names in protobuf's default pool.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor

from sota_serve.grpc import compiled

POOL = descriptor_pool.DescriptorPool()


INFERENCE_FILE: FileDescriptor = POOL.AddSerializedFile(compiled.OPEN_INFERENCE)
HEALTH_FILE: FileDescriptor = POOL.AddSerializedFile(compiled.HEALTH)
INFERENCE_SERVICE: ServiceDescriptor = INFERENCE_FILE.services_by_name["GRPCInferenceService"]
HEALTH_SERVICE: ServiceDescriptor = HEALTH_FILE.services_by_name["Health"]


def message(full_name: str) -> Any:
    """The class of the message named ``full_name`` (``inference.ModelInferRequest``)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


InferParameter = message("inference.InferParameter")
ModelInferRequest = message("inference.ModelInferRequest")
ModelInferResponse = message("inference.ModelInferResponse")
HealthCheckResponse = message("grpc.health.v1.HealthCheckResponse")
