"""A bound on the occluded crops that exist at once in a server, across all its explanations.

Admission (:mod:`sota_serve.serving.admission`) bounds the *time* of the work in flight, not its
memory: an explanation's grid*grid + 1 crops weigh like that many plain requests' single crops
in the queue, but a plain request's crop is made when it is decoded and an explanation's are
copies of one crop, which can be made just before the model needs them. So a server makes them
a slice at a time, and a slice's crops exist only between a :meth:`CropBudget.acquire` and its
:meth:`CropBudget.release`: whatever the number of explanations in flight, at most
``capacity`` occluded crops exist at once.

Waiting slices are served oldest request first (then in order within a request), not round
robin: the earliest explanation gets the crops it can use and finishes first, as it would have
with all its crops queued at once, instead of every explanation in flight finishing together
at the end.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any


class CropBudget:
    """At most ``capacity`` crops held at once; call on one event loop."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        #: crops held now, and the most held at once so far
        self.in_use = self.peak = 0
        self._waiting: list[tuple[Any, int, int, asyncio.Future[None]]] = []  # (priority, seq, n, future)
        self._seq = itertools.count()

    async def acquire(self, n: int, priority: Any) -> None:
        """Wait until ``n`` crops fit (the lowest ``priority`` first), then hold them: pair with
        :meth:`release`. A cancelled wait holds nothing."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"a slice of {n} crops cannot fit a budget of {self.capacity}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._seq), n, future))
        self._grant()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as the wait was cancelled
                self.release(n)
            raise

    def release(self, n: int) -> None:
        self.in_use -= n
        self._grant()

    def _grant(self) -> None:
        """Hand crops to the waiters in priority order while the first one fits."""
        while self._waiting:
            _, _, n, future = self._waiting[0]
            if future.done():  # its wait was cancelled
                heapq.heappop(self._waiting)
                continue
            if self.in_use + n > self.capacity:
                return
            heapq.heappop(self._waiting)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            future.set_result(None)
