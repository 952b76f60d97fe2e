"""BentoML serving layer: thin wiring between HTTP and :mod:`sota_serve`."""
