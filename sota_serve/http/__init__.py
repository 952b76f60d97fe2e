"""The HTTP contract as plain ASGI, shared by the front ends (``bento/`` for BentoML,
``rayserve/`` for Ray Serve): the front door (limits, admission, direct routes), the route
table, the JSON error shape, multipart parsing and the Open Inference Protocol.

No web framework here: each front end wraps :class:`~sota_serve.http.front_door.FrontDoor`
around its own app (BentoML's) or a bare fallback (:mod:`sota_serve.http.app`).
"""
