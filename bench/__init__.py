"""Benchmarks: model ceiling, offline pipeline, HTTP service and a naive BentoML peer."""
