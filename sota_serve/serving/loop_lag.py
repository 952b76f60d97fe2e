"""How late the event loop runs what is due on it: the part of a request's latency that no
stage measures.

Every request passes through the worker's event loop twice outside the measured stages: its
body is read there before the front door sees it, and its answer is written there once the
model thread has finished. When the loop is busy (HTTP parsing, JSON answers, hundreds of
connections), both wait behind other callbacks. A latency budget that counts only decode and
model time then misses by that wait.

:class:`LoopLag` samples it directly: a task that sleeps ``interval_s`` and records how much
later than asked it woke up, kept as a recent high quantile (:class:`RecentTail`), as the
measured stage costs are. The sampling task costs one wake-up per interval.
"""

from __future__ import annotations

import asyncio

from sota_serve.serving.profile import RecentTail

#: seconds between samples: short enough to follow a burst, long enough to cost nothing
SAMPLE_INTERVAL_S = 0.02
#: the quantile read: the lag is paid at every turn a request waits for, and the turns a strict
#: answer waits before it is written are the last thing the server can still count, so the
#: 99th percentile of the last 128 samples (about 2.5 s), not the 95th of the stage costs
LAG_QUANTILE = 0.99


class LoopLag:
    """The event loop's lag at a recent high quantile; 0.0 until it is sampled."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, tail: RecentTail | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be above 0, got {interval_s}")
        self.interval_s = interval_s
        self.tail = tail or RecentTail(quantile=LAG_QUANTILE)
        self._task: asyncio.Task[None] | None = None

    @property
    def value(self) -> float:
        return self.tail.value or 0.0

    def ensure_running(self) -> None:
        """Start sampling on the running loop, once (call from the loop, e.g. per request)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sample(), name="sota-loop-lag")

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.tail.add(max(0.0, loop.time() - asked))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
