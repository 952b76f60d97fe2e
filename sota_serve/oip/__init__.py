"""The Open Inference Protocol v2 (KServe v2, Triton) for an image classifier, whatever the
transport: the messages (:mod:`sota_serve.oip.messages`) and the model they are answered by
(:mod:`sota_serve.oip.model`). REST is sota_serve/http/oip.py, gRPC sota_serve/grpc/.
"""
