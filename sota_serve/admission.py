"""Admission control: decide at the door whether a request can be served within its deadline.

A server that accepts everything under overload serves nobody well: the queue grows, every
request waits, and work is spent on requests whose clients have given up. This policy
estimates how long the work already in flight takes to drain, from measured costs (decode
time per image, model time per crop) and admits a new request only if it would start within
``max_wait_s``. Otherwise the request is refused before its body is read, with a
``Retry-After`` equal to the estimated drain time: the client learns when to come back.

A hard cap on requests in flight bounds memory (each holds its upload) whatever the
estimates say.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sota_serve.batcher import Ewma


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str = ""
    retry_after_s: int = 0


class Admission:
    def __init__(self, *, max_wait_s: float, max_in_flight: int, decode_threads: int,
                 seconds_per_crop: Ewma | None = None, on_shed: Callable[[str], None] | None = None) -> None:
        self.on_shed = on_shed
        self.max_wait_s, self.max_in_flight, self.decode_threads = max_wait_s, max_in_flight, decode_threads
        self.seconds_per_crop = seconds_per_crop or Ewma()
        self.decode_seconds = Ewma()
        self.in_flight = 0
        self.pending_images = 0  # admitted, not yet decoded
        self.pending_crops = 0  # admitted, not yet through the model
        self.shed = 0
        self._lock = threading.Lock()  # decode threads report costs concurrently

    # --- estimates ------------------------------------------------------------------------

    def drain_s(self) -> float:
        """Seconds until the work in flight is done, with the costs measured so far.

        Decode and model time are added, not overlapped: on a CPU both share the same cores.
        """
        decode = (self.decode_seconds.value or 0.0) * self.pending_images / max(1, self.decode_threads)
        model = (self.seconds_per_crop.value or 0.0) * self.pending_crops
        return decode + model

    def retry_after(self) -> int:
        return max(1, math.ceil(self.drain_s()))

    # --- the door -------------------------------------------------------------------------

    def try_enter(self) -> Decision:
        """Called before a request's body is read. On admission, call :meth:`leave` once."""
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self._shed("in_flight")
                return Decision(False, f"server busy: {self.in_flight} requests in flight (limit"
                                       f" {self.max_in_flight}, SOTA_SERVE_MAX_IN_FLIGHT)", self.retry_after())
            wait = self.drain_s()
            if wait > self.max_wait_s:
                self._shed("queue")
                return Decision(False, f"server busy: the queue needs about {wait:.1f}s to drain, above"
                                       f" the {self.max_wait_s:g}s bound (SOTA_SERVE_MAX_WAIT_S)",
                                self.retry_after())
            self.in_flight += 1
            return Decision(True)

    def _shed(self, reason: str) -> None:
        self.shed += 1
        if self.on_shed:
            self.on_shed(reason)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # --- work accounting (the handler reports what a request turned out to cost) ----------

    def charge(self, images: int, crops: int) -> None:
        with self._lock:
            self.pending_images += images
            self.pending_crops += crops

    def decoded(self, images: int, seconds: float | None) -> None:
        with self._lock:
            self.pending_images -= images
            if seconds is not None:
                self.decode_seconds.add(seconds)

    def computed(self, crops: int) -> None:
        with self._lock:
            self.pending_crops -= crops
