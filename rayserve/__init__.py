"""Ray Serve front end: the service across the nodes of a Ray cluster (``serve run
rayserve.app:app model=...``): ingress replicas serve the HTTP contract of :mod:`sota_serve.http`
and forward each request to model replicas running the serving core of :mod:`sota_serve.serving`."""
