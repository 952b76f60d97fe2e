"""The TTA fallback ladder: under load, answer with a cheaper policy instead of late or not at all.

A five-crop answer costs five model calls per image. When the queue is long, a request that
asked for it either waits (its latency grows with the queue) or, past the admission bound, is
refused. A client that opted in (``tta_fallback``) prefers an answer within its latency
budget at a known, slightly lower accuracy: the card records each policy's accuracy, so the
trade is visible (``docs/tta-and-ood.md``).

The ladder steps down from the requested policy through the cheaper policies the card lists
(ten_crop -> five_crop -> flip -> none), leaving out a policy whose recorded accuracy a cheaper
one matches (on the demo, flip's 95.6 % against none's 99.4 %: mirrored digits are not digits,
so flip would cost twice none's work for a worse answer), and serves the first whose estimated completion fits
the budget: the time since the request reached the door plus admission's estimate of when its
answer is written (:meth:`Admission.completion_s`: its own decode behind the bytes ahead of
it, the crops in flight, its own crops as one device call at the tail of that call's measured
times, then the event loop's lag). When even ``none`` does not fit, ``none`` is served, late;
with a strict budget (``tta_budget_strict``) the request is refused at once instead (503 +
Retry-After, :class:`BudgetExceededError`), again at dispatch if its crops can no longer be
answered in time, and a last time when its answer is ready after the due time: a strict
request gets its answer within the budget or a 503, never a late answer. At dispatch the
crops already cut for one policy cannot be served as another (each policy resizes the image
to its own scale, and cutting again would cost a second decode), so a request that no longer
fits is refused there if strict and run as it is if not. The decision is taken before the request's crops
are charged, so admission accounts for the policy that runs.

Off by default (``SOTA_SERVE_TTA_FALLBACK``), so that an answer's ``tta`` is the one asked
for unless someone chose otherwise; every answer names both (``tta``, ``requested_tta``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sota_serve.errors import BadRequestError, BudgetExceededError, MalformedRequestError
from sota_serve.package.card import ModelCard, accuracy_key
from sota_serve.serving.admission import Admission, ModelCost, Ticket
from sota_serve.tta import CROPS_PER_IMAGE

#: what fraction of the admission bound (SOTA_SERVE_MAX_WAIT_S) the default latency budget is
DEFAULT_BUDGET_SHARE = 0.1
#: what the front ends' answer counter by (requested, served) policy counts
TTA_ANSWERS = ("Answered requests by the TTA policy asked for and the one served (the fallback ladder;"
               " served=refused: a strict budget's 503)")
#: the served policy the answer counter names for a request a strict budget refused
REFUSED = "refused"
#: the longest budget a request may ask for, in seconds
MAX_BUDGET_S = 3600.0

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class FallbackAsk:
    """What one request asked for; None: the server's default."""

    enabled: bool | None = None
    budget_s: float | None = None
    #: refuse (503) rather than answer after the budget
    strict: bool | None = None

    @classmethod
    def parse(cls, enabled: object = None, budget_s: object = None, strict: object = None, *,
              where: str = "") -> FallbackAsk:
        """From a form's or a v2 request's values (JSON values, or their text). Raises
        MalformedRequestError (400) for a value of the wrong kind, BadRequestError (422) for a
        budget out of range; ``where`` prefixes the field names (``parameter `` for v2)."""
        return cls(_flag(enabled, f"{where}tta_fallback"), _budget(budget_s, f"{where}tta_budget_s"),
                   _flag(strict, f"{where}tta_budget_strict"))


def _flag(value: object, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise MalformedRequestError(f"{name} must be true or false, got {value!r:.40}")


def _budget(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise MalformedRequestError(f"{name} must be a number of seconds, got {value!r:.40}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedRequestError(f"{name} must be a number of seconds, got {value!r:.40}")
    if not (math.isfinite(value) and 0 < value <= MAX_BUDGET_S):
        raise BadRequestError(f"{name} must be above 0 and at most {MAX_BUDGET_S:g} seconds, got {value:g}")
    return float(value)


def recorded_accuracy(card: ModelCard) -> dict[str, float]:
    """Each policy's validation accuracy, where the card records it."""
    if card.metrics is None:
        return {}
    found = {p: getattr(card.metrics, accuracy_key(p)) for p in card.tta.policies()}
    return {p: v for p, v in found.items() if v is not None}


class Ladder:
    """Chooses the policy a request is served with; one per worker, beside admission."""

    def __init__(self, policies: tuple[str, ...], admission: Admission, *, enabled: bool, budget_s: float,
                 accuracy: dict[str, float] | None = None, strict: bool = False,
                 cost: ModelCost | None = None) -> None:
        """``policies``: the card's (any order); ``enabled``/``budget_s``/``strict``: the
        server's defaults; ``accuracy``: each policy's recorded accuracy, where known
        (:func:`recorded_accuracy`); ``cost``: its model's costs in admission (default: the first)."""
        self.admission, self.enabled, self.budget_s, self.strict = admission, enabled, budget_s, strict
        self.cost = cost
        self.accuracy = accuracy or {}
        #: costliest first: the order the ladder steps down in
        self.rungs = tuple(sorted(policies, key=lambda p: -CROPS_PER_IMAGE[p]))

    def steps(self, requested: str) -> tuple[str, ...]:
        """``requested``, then each cheaper policy the card lists, costliest first, but for
        those a cheaper one is recorded to match in accuracy."""
        k = CROPS_PER_IMAGE[requested]
        cheaper = [p for p in self.rungs if CROPS_PER_IMAGE[p] < k]
        return (requested, *(p for i, p in enumerate(cheaper) if not self._matched(p, cheaper[i + 1:])))

    def _matched(self, policy: str, cheaper: list[str]) -> bool:
        mine = self.accuracy.get(policy)
        return mine is not None and any(self.accuracy.get(q, -1.0) >= mine for q in cheaper)

    def choose(self, requested: str, images: int, ticket: Ticket, ask: FallbackAsk | None = None) -> str:
        """The policy to serve ``images`` images of a request that asked for ``requested``.
        Raises :class:`BudgetExceededError` when the budget is strict and no policy fits."""
        ask = ask or FallbackAsk()
        if not self._enabled(ask):
            return requested
        budget = self._budget(ask)
        now = time.monotonic()
        waited = now - ticket.sent_at
        steps = self.steps(requested)
        for policy in steps:
            if waited + self.admission.completion_s(images * CROPS_PER_IMAGE[policy], ticket.bytes, self.cost) <= budget:
                return self._forecast(policy, images, ticket, now)
        if self._strict(ask):
            raise BudgetExceededError(
                f"not even tta 'none' can be answered within the {budget:g} s budget now (about"
                f" {waited + self.admission.completion_s(images, ticket.bytes, self.cost):.2f} s); refused at once"
                " because the budget is strict (tta_budget_strict)",
                retry_after_s=self.admission.retry_after())
        return self._forecast(steps[-1], images, ticket, now)

    def _forecast(self, policy: str, images: int, ticket: Ticket, now: float) -> str:
        """``policy``, with its uncorrected forecast kept on the ticket for admission to learn
        from when the answer is ready (:meth:`Admission.learn_ready`)."""
        ticket.forecast = (now, self.admission.ready_s(images * CROPS_PER_IMAGE[policy], ticket.bytes, self.cost))
        return policy

    def due(self, ticket: Ticket, ask: FallbackAsk | None = None) -> float | None:
        """When a strict request's answer stops being wanted (``time.monotonic()``), for the
        batcher's check at dispatch; None for a request that takes a late answer."""
        ask = ask or FallbackAsk()
        if not (self._enabled(ask) and self._strict(ask)):
            return None
        return ticket.sent_at + self._budget(ask)

    # A request's own choice, else the server's default.
    def _enabled(self, ask: FallbackAsk) -> bool:
        return self.enabled if ask.enabled is None else ask.enabled

    def _budget(self, ask: FallbackAsk) -> float:
        return self.budget_s if ask.budget_s is None else ask.budget_s

    def _strict(self, ask: FallbackAsk) -> bool:
        return self.strict if ask.strict is None else ask.strict
