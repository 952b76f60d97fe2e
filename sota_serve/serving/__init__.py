"""Serving mechanics with no web framework in them: settings and the sizing plan
(:mod:`.settings`), admission control (:mod:`.admission`), dynamic batching (:mod:`.batcher`)
and the pipeline that runs the offline classifier's stages under load (:mod:`.pipeline`).
A front end (``bento/`` for BentoML) is a thin adapter over :class:`.pipeline.Pipeline`."""
