"""The Open Inference Protocol over gRPC (KServe's ``GRPCInferenceService``) and gRPC's health
service, for a front end to serve on a port of its own: the .proto files and their compiled
descriptors (:mod:`~sota_serve.grpc.protos`), the protocol buffers to and from the protocol's
messages (:mod:`~sota_serve.grpc.codec`), typed errors as status codes
(:mod:`~sota_serve.grpc.status`), the services (:mod:`~sota_serve.grpc.servicer`,
:mod:`~sota_serve.grpc.health`) and the server that holds them (:mod:`~sota_serve.grpc.server`).
"""
