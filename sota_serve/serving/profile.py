"""Measured costs kept as a recent high percentile, not a mean: what a latency budget needs.

A mean says how fast the queue drains on average; a request that must be answered within a
budget needs to know how long it takes when it is slow. Clockwork (OSDI'20) predicts each batch
size's run time from the tail of its last measurements and met its SLO for nearly every
request; a mean over all batch sizes, as the admission bound uses, kept only the median near
the budget (bench/results/fallback.json).

:class:`RecentTail` keeps the last ``size`` samples of one cost and answers a high quantile of
them. :class:`LatencyProfile` keeps one per batch size class (crops per device call, in powers
of two): a batch of 8 crops and one of 64 do not cost the same per crop, and a request's own
crops run as one batch on one model thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque

#: the quantile a budget is held to: one answer in twenty may be slower than the estimate
TAIL_QUANTILE = 0.95
#: samples per cost: about the last few seconds under load, so the tail follows the load
RECENT_SAMPLES = 128


class RecentTail:
    """A high quantile of the last ``size`` samples, and of those no older than ``horizon_s``
    when given; ``None`` before the first (or once all are older).

    A horizon matters where samples come from answers rather than from the clock: at a few
    requests a second, 512 answers are minutes old, and a cost learned in a burst long past
    would still be charged; where a high estimate stops the very answers that would lower it
    (a strict budget refuses what its estimate says is late), it would be charged for ever.
    """

    def __init__(self, size: int = RECENT_SAMPLES, quantile: float = TAIL_QUANTILE,
                 horizon_s: float | None = None) -> None:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile, self.horizon_s = quantile, horizon_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)  # (when, sample)
        self._value: float | None = None
        self._stale = False
        self._lock = threading.Lock()  # decode threads and the event loop add samples

    def add(self, sample: float) -> None:
        with self._lock:
            self._samples.append((time.monotonic(), sample))
            self._stale = True

    @property
    def value(self) -> float | None:
        """The quantile, sorted again only after new samples or expired ones (estimates are
        asked per request)."""
        with self._lock:
            if self.horizon_s is not None:
                oldest = time.monotonic() - self.horizon_s
                while self._samples and self._samples[0][0] < oldest:
                    self._samples.popleft()
                    self._stale = True
            if self._stale:
                ordered = sorted(sample for _, sample in self._samples)
                self._value = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))] if ordered else None
                self._stale = False
            return self._value

    def __len__(self) -> int:
        return len(self._samples)


def size_class(crops: int) -> int:
    """The power of two at or above ``crops``: batches of 5 to 8 crops share one profile."""
    return 1 << max(0, crops - 1).bit_length()


class LatencyProfile:
    """Seconds per crop of a device call, by its batch size class, at a recent high quantile."""

    def __init__(self, size: int = RECENT_SAMPLES, quantile: float = TAIL_QUANTILE) -> None:
        self.size, self.quantile = size, quantile
        self._classes: dict[int, RecentTail] = {}

    def add(self, crops: int, seconds: float) -> None:
        """One device call of ``crops`` crops took ``seconds``."""
        cls = size_class(crops)
        tail = self._classes.get(cls)
        if tail is None:
            tail = self._classes.setdefault(cls, RecentTail(self.size, self.quantile))
        tail.add(seconds / crops)

    def per_crop_s(self, crops: int) -> float | None:
        """Seconds per crop of a call of ``crops`` crops: its own class's tail where measured,
        else the nearest measured class's, the smaller one first (a smaller batch costs more
        per crop, so the estimate errs long)."""
        if not self._classes:
            return None
        want = size_class(crops)
        measured = sorted(self._classes)
        nearest = min(measured, key=lambda c: (abs(c.bit_length() - want.bit_length()), c))
        return self._classes[nearest].value

    def run_s(self, crops: int) -> float | None:
        """Seconds one device call of ``crops`` crops takes, at the tail."""
        per_crop = self.per_crop_s(crops)
        return None if per_crop is None else per_crop * crops
