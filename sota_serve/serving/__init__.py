"""Serving mechanics with no web framework in them: settings and the sizing plan
(:mod:`.settings`), admission control (:mod:`.admission`), dynamic batching (:mod:`.batcher`)
and the pipeline that runs the offline classifier's stages under load (:mod:`.pipeline`).
A front end (``bento/`` for BentoML, ``rayserve/`` for Ray Serve) serves it through the
HTTP layer in :mod:`sota_serve.http`."""
