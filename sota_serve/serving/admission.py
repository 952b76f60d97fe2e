"""Admission control: decide at the door whether a request can be served within its deadline.

A server that accepts everything under overload serves nobody well: the queue grows, every
request waits, and work is spent on requests whose clients have given up. This policy
estimates how long the work already in flight takes to drain and admits a new request only
if it would start within ``max_wait_s``. Otherwise the request is refused before its body is
read (:class:`OverloadedError`, 503) with a ``Retry-After`` equal to the estimated drain
time: the client learns when to come back.

The estimate has two parts, both from measured costs:

- decoding: seconds per upload byte (JPEG/PNG decode time grows with the encoded size far
  more predictably than per image) times the bytes admitted and not yet decoded. The size of
  a request is known at the door from its ``Content-Length``, so a burst is accounted for
  the moment it arrives, before any of it has been decoded;
- the model: seconds per crop times the crops queued or running, divided by the model calls
  that run at once (the batcher's ``model_threads``); with several models in one worker, each
  model's crops at that model's own cost (:class:`ModelCost`), summed;

and the drain time is the larger of the two, since the stages run at the same time.

Each admitted request holds a :class:`Ticket` for its share; :meth:`Admission.leave` releases
whatever is left of it, so the accounting stays exact on every error path. A hard cap on
requests in flight bounds memory (each holds its upload) whatever the estimates say.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sota_serve.errors import OverloadedError
from sota_serve.serving.batcher import Ewma
from sota_serve.serving.loop_lag import LoopLag
from sota_serve.serving.profile import LatencyProfile, RecentTail

#: forecast misses kept, and the quantile added: p99 of the last 512 answers (about two seconds
#: at the load where it matters), so the 5th-latest miss, not the single latest, and none older
#: than 10 s: a miss is a fact about the recent load, and one from a burst long past would keep
#: a strict budget refusing the answers that would teach it otherwise
FORECAST_SAMPLES = 512
FORECAST_QUANTILE = 0.99
FORECAST_HORIZON_S = 10.0


@dataclass(eq=False)
class ModelCost:
    """One model's measured cost per crop (a mean, and the tail by batch size, which its batcher
    feeds) and its crops queued or running. Models differ by orders of magnitude (the demo's
    crop costs 2 ms, xresnet50's 40 ms on two cores): one average over a worker's models would
    admit a burst for the costly one as if it were cheap."""

    name: str = ""
    seconds_per_crop: Ewma = field(default_factory=Ewma)
    profile: LatencyProfile = field(default_factory=LatencyProfile)
    pending: int = 0


@dataclass
class Ticket:
    """One admitted request's share of the estimated work."""

    bytes: int = 0  # upload bytes not yet decoded
    crops: int = 0  # crops not yet through the model
    #: the model its crops are charged to (set by :meth:`Admission.charge`)
    cost: ModelCost | None = None
    admitted_at: float = field(default_factory=time.monotonic)
    #: when the request reached the door (before any hold there)
    arrived_at: float = field(default_factory=time.monotonic)
    #: the event loop's lag when it did: about how long its bytes waited to be read before
    before_s: float = 0.0
    #: (when, seconds): the ladder's forecast of its answer being ready, kept to learn from
    forecast: tuple[float, float] | None = None

    @property
    def sent_at(self) -> float:
        """About when the client sent it: a latency budget counts from here."""
        return self.arrived_at - self.before_s


class Admission:
    def __init__(self, *, max_wait_s: float, max_in_flight: int, decode_threads: int, model_threads: int = 1,
                 seconds_per_crop: Ewma | None = None, seconds_per_byte: Ewma | None = None,
                 on_shed: Callable[[str], None] | None = None) -> None:
        self.on_shed = on_shed
        self.max_wait_s, self.max_in_flight, self.decode_threads = max_wait_s, max_in_flight, decode_threads
        self.model_threads = model_threads
        #: the cost of the worker's first model, and of a request no model has charged yet
        self.cost = ModelCost(seconds_per_crop=seconds_per_crop or Ewma())
        #: every model served by this worker (:meth:`model_cost`), the first one included
        self.costs: list[ModelCost] = [self.cost]
        self.seconds_per_byte = seconds_per_byte or Ewma()
        #: decoding's cost at its recent tail, for a request's completion (:meth:`completion_s`)
        self.byte_tail = RecentTail()
        #: the event loop's lag, which a request waits out before the door and its answer after
        self.loop_lag = LoopLag()
        #: how much later than forecast answers were ready: the last few seconds' misses
        self.forecast_miss = RecentTail(size=FORECAST_SAMPLES, quantile=FORECAST_QUANTILE,
                                        horizon_s=FORECAST_HORIZON_S)
        self.in_flight = 0
        self.pending_bytes = 0  # admitted, not yet decoded
        self.shed = 0
        self._lock = threading.Lock()  # decode threads report costs concurrently
        self._waiters: deque[asyncio.Future[None]] = deque()  # held at the door, oldest first

    @property
    def pending_crops(self) -> int:
        """Crops queued for or running in the models, all models together."""
        return sum(c.pending for c in self.costs)

    @property
    def seconds_per_crop(self) -> Ewma:
        """The first model's mean cost per crop."""
        return self.cost.seconds_per_crop

    @property
    def profile(self) -> LatencyProfile:
        """The first model's cost per device call by batch size, at its recent tail."""
        return self.cost.profile

    def model_cost(self, name: str) -> ModelCost:
        """A cost of its own for another model served beside the first (released by
        :meth:`forget` when the model is unloaded)."""
        with self._lock:
            cost = ModelCost(name)
            self.costs = [*self.costs, cost]
            return cost

    def forget(self, cost: ModelCost) -> None:
        """``cost``'s model is unloaded (its requests have left)."""
        with self._lock:
            if cost is not self.cost:
                self.costs = [c for c in self.costs if c is not cost]

    # --- estimates ------------------------------------------------------------------------

    def drain_s(self) -> float:
        """Seconds until the work in flight is done, with the costs measured so far.

        Decoding and the model run at the same time, on threads that share the cores, and
        both costs are measured in wall-clock time while they do: each already includes the
        slowdown the other causes. The slower stage sets the pace, so the drain time is the
        larger of the two, not their sum (the sum counted the sharing twice and shed
        five-crop load at 512 clients while the true queue was 6.6 s, under the 10 s bound).
        """
        decode = (self.seconds_per_byte.value or 0.0) * self.pending_bytes / max(1, self.decode_threads)
        model = sum((c.seconds_per_crop.value or 0.0) * c.pending for c in self.costs) / max(1, self.model_threads)
        return max(decode, model)

    def ready_s(self, crops: int, own_bytes: int = 0, cost: ModelCost | None = None) -> float:
        """Seconds until a request whose ``own_bytes`` are admitted and not yet decoded, and
        which is about to queue ``crops`` crops, has its answer computed, from the measured
        costs.

        Its images are decoded once the bytes ahead of them are (shared by the decode
        threads), its own on one thread each; meanwhile the crops in flight drain over the
        model threads; then its own crops run as one device call on one model thread, which
        the other threads do not shorten. ``cost``: the model it runs on (default: the first);
        the crops in flight count at their own models' costs.

        Which figure each part reads (:mod:`sota_serve.serving.profile`): the bytes ahead are
        many images, whose decode times vary with their content, not with the load, so their
        sum is near its mean per byte (the tail per byte, applied to each of them, made the
        decode estimate three to four times the measured wait on the demo); the request's own
        decode and its own device call are one sample each, read at the tail. The crops in
        flight drain at the tail per crop: what slows one device call (the cores shared with
        decoding and the HTTP work) slows the calls after it too.
        """
        mean_per_byte = self.seconds_per_byte.value or 0.0
        tail_per_byte = self.byte_tail.value or mean_per_byte
        ahead = max(0, self.pending_bytes - own_bytes)
        decoded = mean_per_byte * ahead / max(1, self.decode_threads) + tail_per_byte * own_bytes
        drained = sum((c.profile.per_crop_s(self.pending_crops) or c.seconds_per_crop.value or 0.0) * c.pending
                      for c in self.costs) / max(1, self.model_threads)
        cost = cost or self.cost
        own = cost.profile.run_s(crops) if crops else 0.0
        return max(decoded, drained) + (own if own is not None else (cost.seconds_per_crop.value or 0.0) * crops)

    def completion_s(self, crops: int, own_bytes: int = 0, cost: ModelCost | None = None) -> float:
        """Seconds until such a request's answer is written: :meth:`ready_s`, plus what the
        estimate has recently missed by (:meth:`calibration_s`), plus the event loop's lag
        that the finished answer waits out (:meth:`delivery_s`)."""
        return self.ready_s(crops, own_bytes, cost) + self.calibration_s() + self.delivery_s()

    def calibration_s(self) -> float:
        """How much later than :meth:`ready_s` forecast answers have recently been ready, at
        the 99th percentile (0 when the forecasts hold).

        The estimate models decoding and the device; what it leaves out (the GIL and the cores
        shared with HTTP work, threads scheduled late) shows up as answers later than
        forecast. Adding the recent tail of that miss makes the forecast hold for 99 % of
        answers whatever its cause, as a conformal prediction interval does; it is learned
        from the uncorrected forecast, so the correction does not feed on itself.
        """
        return max(0.0, self.forecast_miss.value or 0.0)

    def learn_ready(self, ticket: Ticket) -> None:
        """The request of ``ticket`` has its answer now: learn how far its forecast missed."""
        if ticket.forecast is not None:
            at, forecast = ticket.forecast
            self.forecast_miss.add(time.monotonic() - at - forecast)
            ticket.forecast = None

    def delivery_s(self) -> float:
        """Seconds a finished answer waits for the event loop to write it (its recent lag)."""
        return self.loop_lag.value

    def retry_after(self) -> int:
        return max(1, math.ceil(self.drain_s()))

    # --- the door -------------------------------------------------------------------------

    async def wait_enter(self, nbytes: int, hold_s: float) -> Ticket:
        """:meth:`enter`, but a request over the bound first waits up to ``hold_s``, in arrival
        order, for requests in flight to leave, and is refused only then.

        A client that re-sends at once after a 503 would otherwise turn overload into a storm
        of refusals whose cost (HTTP parsing, middlewares) slows the model and the decoders,
        which raises the measured costs and the refusals further. Measured on 2 cores, demo
        model, five-crop, 512 clients re-sending at once: 41.6 req/s of goodput against 78 at
        the peak without the hold. A held request costs an idle future. Call on the event loop
        that calls :meth:`leave`.
        """
        arrived = time.monotonic()
        self.loop_lag.ensure_running()
        try:
            return self._arrived(self.enter(nbytes, count_shed=hold_s <= 0), arrived)
        except OverloadedError:
            if hold_s <= 0:
                raise  # counted by enter
            if len(self._waiters) >= self.max_in_flight:
                self._shed("queue")
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_s
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(waiter, remaining)
                except TimeoutError:
                    break
                try:
                    return self._arrived(self.enter(nbytes, count_shed=False), arrived)
                except OverloadedError:  # not enough left yet: wait for the next one, first in line
                    waiter = loop.create_future()
                    self._waiters.appendleft(waiter)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        # the last word: admitted, or refused with the current estimate
        return self._arrived(self.enter(nbytes), arrived)

    def _arrived(self, ticket: Ticket, at: float) -> Ticket:
        ticket.arrived_at, ticket.before_s = at, self.loop_lag.value
        return ticket

    def enter(self, nbytes: int, *, count_shed: bool = True) -> Ticket:
        """Admit a request of ``nbytes`` (its Content-Length, 0 if unknown) or raise
        :class:`OverloadedError`. Called before the body is read; pair with :meth:`leave`."""
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                if count_shed:
                    self._shed("in_flight")
                raise OverloadedError(f"server busy: {self.in_flight} requests in flight (limit"
                                      f" {self.max_in_flight}, SOTA_SERVE_MAX_IN_FLIGHT)",
                                      retry_after_s=self.retry_after())
            wait = self.drain_s()
            if wait > self.max_wait_s:
                if count_shed:
                    self._shed("queue")
                raise OverloadedError(f"server busy: the queue needs about {wait:.1f}s to drain, above"
                                      f" the {self.max_wait_s:g}s bound (SOTA_SERVE_MAX_WAIT_S)",
                                      retry_after_s=self.retry_after())
            self.in_flight += 1
            self.pending_bytes += nbytes
            return Ticket(bytes=nbytes)

    def _shed(self, reason: str) -> None:
        self.shed += 1
        if self.on_shed:
            self.on_shed(reason)

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            self.pending_bytes -= ticket.bytes
            self._release_crops(ticket)
            ticket.bytes = 0
            self.in_flight -= 1
        while self._waiters:  # one request left: the longest-held one may fit now
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    # --- a request's progress (reported by the guard and the handler) ---------------------

    def resize(self, ticket: Ticket, nbytes: int) -> None:
        """The body turned out to be ``nbytes`` long (no or a wrong Content-Length)."""
        with self._lock:
            self.pending_bytes += nbytes - ticket.bytes
            ticket.bytes = nbytes

    def decoded(self, ticket: Ticket) -> None:
        with self._lock:
            self.pending_bytes -= ticket.bytes
            ticket.bytes = 0

    def charge(self, ticket: Ticket, crops: int, cost: ModelCost | None = None) -> None:
        """``crops`` more for the model of ``cost`` (default: the first) to run for ``ticket``."""
        with self._lock:
            cost = cost or self.cost
            if ticket.cost is not None and ticket.cost is not cost:
                self._release_crops(ticket)  # one request, one model at a time
            ticket.cost = cost
            cost.pending += crops
            ticket.crops += crops

    def computed(self, ticket: Ticket) -> None:
        with self._lock:
            self._release_crops(ticket)

    def _release_crops(self, ticket: Ticket) -> None:
        """Under the lock."""
        (ticket.cost or self.cost).pending -= ticket.crops
        ticket.crops = 0

    def learn_decode(self, nbytes: int, seconds: float) -> None:
        """One image of ``nbytes`` took ``seconds`` of one decode thread."""
        with self._lock:
            self.seconds_per_byte.add(seconds / max(1, nbytes))
        self.byte_tail.add(seconds / max(1, nbytes))
