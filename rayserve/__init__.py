"""Ray Serve front end: the service's replicas across the nodes of a Ray cluster
(``serve run rayserve.app:app model=...``), each serving the HTTP contract of
:mod:`sota_serve.http` over the serving core of :mod:`sota_serve.serving`."""
