"""The request contract, written once: each route's and each protocol method's fields as a
pydantic model (name, type, default, bounds, description, and how a sent value is read).

Everything that states a field derives from here: the HTTP form reader
(sota_serve/http/form.py), the Open Inference Protocol's parameters over REST and gRPC
(sota_serve/oip/messages.py), the OpenAPI document (sota_serve/http/openapi.py) and the
BentoML declarations (bento/declarations.py).
"""
