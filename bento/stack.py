"""Where the request guard sits in BentoML's ASGI middleware stack.

BentoML (1.4) puts a service's own middlewares inside its outer ones: Prometheus metrics,
OpenTelemetry, the access log, then its traffic timeout. The guard answers the image routes
itself (bento/routes.py), so for them only some of those outer layers do anything:

- the **metrics** count every request: kept outside the guard;
- the **access log** and **CORS**, when enabled, must see the guard's answers: kept outside;
- **OpenTelemetry** is kept outside only when ``SOTA_SERVE_TRACE_REQUESTS=on``; otherwise the
  image routes are in its excluded URLs and it only checks that per request;
- the **traffic timeout** wraps each request in a second task, a future and a timer; the image
  routes have their own deadline (``SOTA_SERVE_DEADLINE_S``, bento/handlers.py), so it goes
  inside the guard, where it still bounds every request the guard hands on to BentoML.

On 2 cores (demo model, 32 clients) moving the guard out past the timeout and OpenTelemetry
served 1.02x the requests (BENCHMARKS.md). CORS used to sit inside the guard, so the guard's
answers lacked its headers; now it is outside.

BentoML has no option for this order, so :func:`install` wraps ``ServiceAppFactory.middlewares``;
where BentoML's internals are not what this expects it leaves the stack as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: BentoML's outer middlewares that must see every answer of the guard, by class name
#: (their modules are optional imports in BentoML)
ALWAYS_OUTSIDE = frozenset({"RunnerTrafficMetricsMiddleware", "AccessLogMiddleware", "CORSMiddleware"})
TRACING = "OpenTelemetryMiddleware"


def outside(traced: bool) -> frozenset[str]:
    """The class names of the middlewares that stay outside the guard."""
    return ALWAYS_OUTSIDE | {TRACING} if traced else ALWAYS_OUTSIDE


def guard_placed(middlewares: Sequence[Any], guard: type, keep_outside: frozenset[str]) -> list[Any]:
    """``middlewares`` (outermost first, starlette ``Middleware`` entries) with ``guard``
    moved to just inside the last entry named in ``keep_outside``; the others keep their
    order. Unchanged when ``guard`` is not among them."""
    found = [m for m in middlewares if getattr(m, "cls", None) is guard]
    if len(found) != 1:
        return list(middlewares)
    rest = [m for m in middlewares if m is not found[0]]
    kept = [i for i, m in enumerate(rest) if getattr(getattr(m, "cls", None), "__name__", "") in keep_outside]
    at = kept[-1] + 1 if kept else 0
    return [*rest[:at], found[0], *rest[at:]]


def install(guard: type, *, traced: bool) -> bool:
    """Have BentoML build its app with ``guard`` placed by :func:`guard_placed`; True if done."""
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
    except ImportError:
        return False
    original = ServiceAppFactory.__dict__.get("middlewares")
    if not isinstance(original, property) or original.fget is None:
        return False
    if getattr(original.fget, "_sota_guard", None) is not None:
        return True  # already installed (the module imported twice)
    keep = outside(traced)
    build: Callable[[Any], list[Any]] = original.fget

    def middlewares(self: Any) -> list[Any]:
        return guard_placed(build(self), guard, keep)

    middlewares._sota_guard = guard  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)  # type: ignore[method-assign]
    return True
