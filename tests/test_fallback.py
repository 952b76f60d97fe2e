"""The TTA fallback ladder: which policy a request is served with, what admission is charged,
and what the answers and metrics say (the ladder itself, a real pipeline on a real model, and
a real ``bentoml serve``)."""

from __future__ import annotations

import asyncio
import base64
import re
import time

import httpx
import numpy as np
import pytest

from sota_serve.classifier import Classifier
from sota_serve.errors import BadRequestError, BudgetExceededError, MalformedRequestError
from sota_serve.package.card import ModelCard
from sota_serve.serving.admission import Admission, Ticket
from sota_serve.serving.batcher import DynamicBatcher, Ewma
from sota_serve.serving.fallback import FallbackAsk, Ladder, recorded_accuracy
from sota_serve.serving.loop_lag import LoopLag
from sota_serve.serving.pipeline import Answers, Pipeline
from sota_serve.serving.settings import Settings
from tests.helpers import card_dict
from tests.test_oip import NAME
from tests.test_server import post

ALL = ModelCard.parse(card_dict()).tta.policies()  # the test card lists every policy


def _admission(seconds_per_crop: float, pending_crops: int = 0, model_threads: int = 1) -> Admission:
    adm = Admission(max_wait_s=10, max_in_flight=100, decode_threads=1, model_threads=model_threads,
                    seconds_per_crop=Ewma(initial=seconds_per_crop))
    adm.charge(Ticket(), pending_crops)  # the work in flight the estimate reads
    return adm


def test_the_ladder_steps_down_through_the_cards_cheaper_policies():
    ladder = Ladder(ALL, _admission(0.01), enabled=True, budget_s=1)
    assert ladder.steps("ten_crop") == ("ten_crop", "five_crop", "flip", "none")
    assert ladder.steps("five_crop") == ("five_crop", "flip", "none")
    assert ladder.steps("none") == ("none",)
    two = Ladder(("none", "ten_crop"), _admission(0.01), enabled=True, budget_s=1)
    assert two.steps("ten_crop") == ("ten_crop", "none")  # only what the card lists


def test_a_policy_that_a_cheaper_one_matches_in_accuracy_is_not_a_rung():
    # the demo's figures: flip is worse than none (mirrored digits are not digits)
    demo = {"none": 0.9944, "flip": 0.9556, "five_crop": 0.9972, "ten_crop": 0.9833}
    ladder = Ladder(ALL, _admission(0.01), enabled=True, budget_s=1, accuracy=demo)
    assert ladder.steps("ten_crop") == ("ten_crop", "five_crop", "none")  # asked for stays first
    assert ladder.steps("five_crop") == ("five_crop", "none")
    assert ladder.steps("flip") == ("flip", "none")
    even = Ladder(ALL, _admission(0.01), enabled=True, budget_s=1, accuracy={"flip": 0.9, "none": 0.9})
    assert even.steps("five_crop") == ("five_crop", "none")  # no better: not worth twice the work
    partial = Ladder(ALL, _admission(0.01), enabled=True, budget_s=1, accuracy={"five_crop": 0.95})
    assert partial.steps("ten_crop") == ("ten_crop", "five_crop", "flip", "none")  # unknown: kept
    card = ModelCard.parse(card_dict(metrics={"accuracy": 0.9, "accuracy_flip": 0.8}))
    assert recorded_accuracy(card) == {"none": 0.9, "flip": 0.8}


@pytest.mark.parametrize(("pending", "served"), [
    (0, "five_crop"),    # 5 crops x 0.1 s = 0.5 s: fits the 1 s budget
    (4, "five_crop"),    # (4 + 5) x 0.1 = 0.9 s
    (6, "flip"),         # five_crop 1.1 s, flip 0.8 s
    (9, "none"),         # five_crop 1.4, flip 1.1, none 1.0
    (50, "none"),        # nothing fits: the cheapest, since admission let it in
])
def test_the_served_policy_is_the_costliest_that_fits_the_budget(pending, served):
    ladder = Ladder(ALL, _admission(0.1, pending), enabled=True, budget_s=1.0)
    assert ladder.choose("five_crop", 1, Ticket(), None) == served


def test_the_estimate_counts_the_images_the_queue_over_the_model_threads_and_the_time_already_waited():
    adm = _admission(0.1, 0, model_threads=2)
    ladder = Ladder(ALL, adm, enabled=True, budget_s=1.0)
    # A request's own crops run as one call on one thread: 5 images five-crop = 2.5 s, flip
    # 1.0 s (plus the microseconds since it arrived), none 0.5 s.
    assert ladder.choose("five_crop", 5, Ticket(), None) == "none"
    assert ladder.choose("five_crop", 1, Ticket(), None) == "five_crop"  # 0.5 s
    in_flight = Ticket()
    adm.charge(in_flight, 10)  # the crops in flight drain over both threads: 0.5 s, then its own
    assert ladder.choose("five_crop", 1, Ticket(), None) == "flip"  # five_crop 1.0 s + waited; flip 0.7 s
    held = Ticket(arrived_at=time.monotonic() - 0.85)  # held at the door 0.85 s already
    adm.computed(in_flight)
    assert ladder.choose("five_crop", 1, held, None) == "none"  # five_crop 1.35 s, flip 1.05 s, none 0.95 s


def test_the_estimate_reads_each_batch_sizes_tail_not_the_mean():
    adm = _admission(0.01)
    for _ in range(19):
        adm.profile.add(5, 0.05)  # five-crop calls: usually 10 ms a crop
    adm.profile.add(5, 1.0)  # and one in twenty slow: 200 ms a crop
    for _ in range(20):
        adm.profile.add(1, 0.02)  # single crops: 20 ms
    assert adm.completion_s(5) == pytest.approx(1.0)  # the tail of 5-crop calls, not their mean
    assert adm.completion_s(1) == pytest.approx(0.02)
    ladder = Ladder(ALL, adm, enabled=True, budget_s=0.5)
    # five-crop: 1.0 s at the tail (its mean, 0.06 s, said five_crop); flip, unmeasured, is read
    # from the nearest smaller call's tail: 2 x 20 ms
    assert ladder.choose("five_crop", 1, Ticket(), None) == "flip"


def test_the_estimate_counts_the_requests_own_decode_behind_the_bytes_ahead():
    adm = Admission(max_wait_s=10, max_in_flight=100, decode_threads=2, seconds_per_crop=Ewma(initial=0.01))
    for _ in range(10):
        adm.learn_decode(1000, 0.1)  # 100 us a byte
    mine = adm.enter(3000)
    adm.enter(4000)  # admitted before, not decoded yet: shared by the two decode threads
    # 4000 bytes ahead over 2 threads (0.2 s), then its own 3000 on one thread (0.3 s), then 1 crop
    assert adm.completion_s(1, mine.bytes) == pytest.approx(0.2 + 0.3 + 0.01)
    ladder = Ladder(ALL, adm, enabled=True, budget_s=0.515)
    assert ladder.choose("five_crop", 1, mine, None) == "none"  # five-crop 0.55 s, flip 0.52 s


def test_a_strict_budget_refuses_at_once_when_not_even_none_fits():
    busy = _admission(0.1, 100)  # 10 s of work in flight
    ladder = Ladder(ALL, busy, enabled=True, budget_s=1.0)
    assert ladder.choose("five_crop", 1, Ticket(), None) == "none"  # late, not refused
    with pytest.raises(BudgetExceededError, match="tta_budget_strict") as e:
        ladder.choose("five_crop", 1, Ticket(), FallbackAsk(strict=True))
    assert e.value.http_status == 503 and e.value.retry_after_s == 10
    strict = Ladder(ALL, busy, enabled=True, budget_s=1.0, strict=True)  # the server's default
    with pytest.raises(BudgetExceededError):
        strict.choose("five_crop", 1, Ticket(), None)
    assert strict.choose("five_crop", 1, Ticket(), FallbackAsk(strict=False)) == "none"
    arrived = Ticket()
    assert strict.due(arrived) == pytest.approx(arrived.arrived_at + 1.0)
    assert ladder.due(arrived) is None and strict.due(arrived, FallbackAsk(enabled=False)) is None
    idle = Ladder(ALL, _admission(0.1), enabled=True, budget_s=1.0, strict=True)
    assert idle.choose("five_crop", 1, Ticket(), None) == "five_crop"  # strict refuses only what cannot fit


def test_off_by_default_and_the_request_decides_over_the_server():
    busy = _admission(0.1, 100)
    off, on = (Ladder(ALL, busy, enabled=flag, budget_s=1.0) for flag in (False, True))
    assert off.choose("ten_crop", 1, Ticket(), None) == "ten_crop"
    assert off.choose("ten_crop", 1, Ticket(), FallbackAsk(enabled=True)) == "none"
    assert on.choose("ten_crop", 1, Ticket(), None) == "none"
    assert on.choose("ten_crop", 1, Ticket(), FallbackAsk(enabled=False)) == "ten_crop"
    # a request's own budget replaces the server's
    assert on.choose("ten_crop", 1, Ticket(), FallbackAsk(budget_s=12.0)) == "ten_crop"  # 110 crops: 11 s
    assert Settings().tta_fallback is False and Settings().budget_s() == pytest.approx(1.0)
    assert Settings(max_wait_s=4).budget_s() == pytest.approx(0.4)
    assert Settings(tta_budget_s=2.5).budget_s() == 2.5


@pytest.mark.parametrize(("enabled", "budget", "want"), [
    (True, None, FallbackAsk(True, None)), ("true", "0.5", FallbackAsk(True, 0.5)),
    ("False", 2, FallbackAsk(False, 2.0)), (1, None, FallbackAsk(True, None)), ("off", None, FallbackAsk(False)),
    (None, None, FallbackAsk()),
])
def test_the_requests_options_are_read_from_json_or_text(enabled, budget, want):
    assert FallbackAsk.parse(enabled, budget) == want


@pytest.mark.parametrize(("enabled", "budget", "error", "message"), [
    ("maybe", None, MalformedRequestError, "tta_fallback must be true or false"),
    (2, None, MalformedRequestError, "tta_fallback must be true or false"),
    (None, "soon", MalformedRequestError, "tta_budget_s must be a number of seconds"),
    (None, True, MalformedRequestError, "tta_budget_s must be a number of seconds"),
    (None, 0, BadRequestError, "tta_budget_s must be above 0"),
    (None, "nan", BadRequestError, "tta_budget_s must be above 0"),
    (None, 1e9, BadRequestError, "at most 3600"),
])
def test_bad_options_are_refused_with_what_is_wrong(enabled, budget, error, message):
    with pytest.raises(error, match=message):
        FallbackAsk.parse(enabled, budget)


# --- a real pipeline on the tiny model ----------------------------------------------------


def test_a_degraded_request_runs_and_is_charged_as_the_cheaper_policy(tiny_package, photos):
    clf = Classifier.open(tiny_package, device="cpu")
    adm = Admission(max_wait_s=10, max_in_flight=10, decode_threads=1, seconds_per_crop=Ewma(initial=0.3))
    charged: list[tuple[int, int]] = []  # (k of the batch, crops admission holds while it runs)
    told: list[tuple[str, str]] = []

    def annotate(crops, k, policy):  # on the model thread, while the request's crops are charged
        charged.append((k, adm.pending_crops))

    async def run(ask: FallbackAsk) -> Answers:
        batcher = DynamicBatcher(clf.runtime, max_crops=64, seconds_per_crop=adm.seconds_per_crop, annotate=annotate)
        pipeline = Pipeline(clf, batcher, adm, decode_threads=1, deadline_s=30, on_tta=lambda *p: told.append(p),
                            tta_fallback=False, tta_budget_s=1.0)
        try:
            images = [p.read_bytes() for p in photos[:2]]
            return await pipeline.classify(images, "five_crop", 3, adm.enter(0), ask)
        finally:
            batcher.close()

    # 2 images: five_crop 10 crops x 0.3 s = 3 s, flip 1.2 s, none 0.6 s: within 1 s only none
    degraded = asyncio.run(run(FallbackAsk(enabled=True)))
    assert (degraded.tta, degraded.requested_tta) == ("none", "five_crop")
    assert charged == [(1, 2)] and told == [("five_crop", "none")]
    plain = clf.probabilities([p.read_bytes() for p in photos[:2]], "none")
    got = [[p.score for p in r.predictions] for r in degraded.results]
    want = [sorted(row, reverse=True)[:3] for row in plain.tolist()]
    assert np.allclose(got, want, atol=1e-6)  # the plain policy's answer, through the batcher

    charged.clear(), told.clear()
    asked = asyncio.run(run(FallbackAsk(enabled=False)))
    assert (asked.tta, asked.requested_tta) == ("five_crop", "five_crop")
    assert charged == [(5, 10)] and told == [("five_crop", "five_crop")]


class _TwoPhotos:
    """Two photos asked for five-crop through a real pipeline on the tiny model, with the
    ladder on and ``budget_s``; records the policies the answers name and the device calls."""

    def __init__(self, tiny_package, photos, adm: Admission, budget_s: float) -> None:
        self.clf, self.adm, self.budget_s = Classifier.open(tiny_package, device="cpu"), adm, budget_s
        self.images = [p.read_bytes() for p in photos[:2]]
        self.told: list[tuple[str, str]] = []
        self.calls: list[int] = []

    def __call__(self, ask: FallbackAsk) -> Answers:
        return asyncio.run(self._run(ask))

    async def _run(self, ask: FallbackAsk) -> Answers:
        batcher = DynamicBatcher(self.clf.runtime, max_crops=64,
                                 annotate=lambda crops, k, policy: self.calls.append(len(crops)))
        pipeline = Pipeline(self.clf, batcher, self.adm, decode_threads=1, deadline_s=30,
                            on_tta=lambda *p: self.told.append(p), tta_fallback=True, tta_budget_s=self.budget_s)
        ticket = self.adm.enter(0)
        try:
            return await pipeline.classify(self.images, "five_crop", 3, ticket, ask)
        finally:
            self.adm.leave(ticket)
            batcher.close()


def test_a_strict_budget_that_nothing_fits_is_refused_before_any_work_and_counted(tiny_package, photos):
    adm = Admission(max_wait_s=10, max_in_flight=10, decode_threads=1, seconds_per_crop=Ewma(initial=0.3))
    run = _TwoPhotos(tiny_package, photos, adm, budget_s=0.5)
    told, calls = run.told, run.calls

    # 2 images within 0.5 s: five_crop 3 s, flip 1.2 s, none 0.6 s: nothing fits
    with pytest.raises(BudgetExceededError, match="0.5 s budget"):
        run(FallbackAsk(strict=True))
    assert told == [("five_crop", "refused")] and calls == [] and adm.pending_crops == 0
    late = run(FallbackAsk())  # not strict: the cheapest, late
    assert (late.tta, late.requested_tta) == ("none", "five_crop") and calls == [2]


def test_a_strict_answer_that_comes_too_late_is_refused_not_sent(tiny_package, photos):
    """The last check a strict budget gets: the device call ran longer than any measurement
    said (here nothing is measured yet, so every estimate is zero and the request is let through
    the door and the dispatch), and the answer is ready after its due time: 503, not a late 200."""
    adm = Admission(max_wait_s=10, max_in_flight=10, decode_threads=1)
    run = _TwoPhotos(tiny_package, photos, adm, budget_s=0.001)
    told, calls = run.told, run.calls

    with pytest.raises(BudgetExceededError, match="too late for its 0.001 s budget") as e:
        run(FallbackAsk(strict=True))
    assert e.value.http_status == 503 and e.value.retry_after_s >= 1
    assert calls == [10] and told == [("five_crop", "refused")]  # computed, then refused
    assert len(adm.forecast_miss) == 1  # the miss is learned: the next forecast is longer
    late = run(FallbackAsk())  # not strict: answered late (with the cheapest policy)
    assert late.tta == "none" and told[-1] == ("five_crop", "none")


def test_the_bytes_ahead_are_read_at_the_mean_and_the_requests_own_at_the_tail():
    adm = Admission(max_wait_s=10, max_in_flight=100, decode_threads=2, seconds_per_crop=Ewma(initial=0.0))
    for _ in range(19):
        adm.learn_decode(1000, 0.1)  # 100 us a byte
    adm.learn_decode(1000, 1.0)  # one image in twenty ten times slower per byte
    mean, tail = adm.seconds_per_byte.value, adm.byte_tail.value
    assert tail == pytest.approx(1e-3) and mean < 3e-4
    mine = adm.enter(3000)
    adm.enter(40_000)  # forty images' worth ahead: their sum is near the mean
    assert adm.completion_s(0, mine.bytes) == pytest.approx(mean * 40_000 / 2 + tail * 3000)


def test_the_estimate_adds_the_event_loops_lag_that_an_answer_waits_out():
    adm = _admission(0.01)
    quiet = adm.completion_s(1)
    for _ in range(20):
        adm.loop_lag.tail.add(0.2)
    assert adm.delivery_s() == pytest.approx(0.2)
    assert adm.completion_s(1) == pytest.approx(quiet + 0.2)
    ladder = Ladder(ALL, adm, enabled=True, budget_s=0.22)
    assert ladder.choose("five_crop", 1, Ticket(), None) == "none"  # five_crop 0.25 s with the lag


def test_the_forecast_adds_the_recent_tail_of_how_far_it_missed():
    adm = _admission(0.01)
    plain = adm.completion_s(1)
    for _ in range(100):
        ticket = Ticket(forecast=(time.monotonic() - 0.5, 0.2))  # forecast 0.2 s, ready after 0.5 s
        adm.learn_ready(ticket)
        assert ticket.forecast is None  # learned once
    assert adm.calibration_s() == pytest.approx(0.3, abs=0.01)
    assert adm.completion_s(1) == pytest.approx(plain + 0.3, abs=0.01)
    early = _admission(0.01)
    for _ in range(100):
        early.learn_ready(Ticket(forecast=(time.monotonic(), 5.0)))  # answers far sooner than forecast
    assert early.calibration_s() == 0.0  # the forecast is never shortened below the model's


def test_the_ladder_keeps_its_uncorrected_forecast_and_a_real_answer_teaches_admission(tiny_package, photos):
    clf = Classifier.open(tiny_package, device="cpu")
    adm = Admission(max_wait_s=10, max_in_flight=10, decode_threads=1, seconds_per_crop=Ewma(initial=0.001))
    for _ in range(10):
        adm.learn_ready(Ticket(forecast=(time.monotonic() - 0.2, 0.0)))
    ladder = Ladder(ALL, adm, enabled=True, budget_s=1.0)
    ticket = Ticket()
    assert ladder.choose("five_crop", 1, ticket, None) == "five_crop"
    assert ticket.forecast is not None and ticket.forecast[1] == pytest.approx(adm.ready_s(5))  # not + 0.2

    async def run() -> Answers:
        batcher = DynamicBatcher(clf.runtime, max_crops=64, seconds_per_crop=adm.seconds_per_crop)
        pipeline = Pipeline(clf, batcher, adm, decode_threads=1, deadline_s=30, tta_fallback=True, tta_budget_s=5.0)
        try:
            return await pipeline.classify([photos[0].read_bytes()], "five_crop", 3, adm.enter(0))
        finally:
            batcher.close()

    learned = len(adm.forecast_miss)
    assert asyncio.run(run()).tta == "five_crop" and len(adm.forecast_miss) == learned + 1


def test_time_before_the_door_counts_against_the_budget():
    adm = _admission(0.1)  # five_crop 0.5 s, none 0.1 s
    ladder = Ladder(ALL, adm, enabled=True, budget_s=1.0, strict=True)
    assert ladder.choose("five_crop", 1, Ticket(), None) == "five_crop"
    late = Ticket(before_s=0.85)  # its bytes waited 0.85 s behind a busy event loop
    assert ladder.choose("five_crop", 1, late, None) == "none"  # five_crop 1.35 s, flip 1.05 s
    assert ladder.due(late) == pytest.approx(late.arrived_at - 0.85 + 1.0)


def test_the_loop_lag_is_measured_on_a_loop_that_is_held():
    lag = LoopLag(interval_s=0.005)

    async def main() -> tuple[float, float]:
        lag.ensure_running()
        lag.ensure_running()  # once
        await asyncio.sleep(0.1)
        idle = lag.value
        for _ in range(15):
            time.sleep(0.1)  # a callback that holds the loop 100 ms
            await asyncio.sleep(0)
        return idle, lag.value

    idle, held = asyncio.run(main())
    assert idle < 0.05 and held >= 0.08
    assert LoopLag().value == 0.0  # not sampled yet: no lag assumed


# --- over HTTP ----------------------------------------------------------------------------


def test_a_strict_budget_answers_503_with_retry_after_and_metrics_count_it(server, photos):
    image = {"image": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    strict = {"tta": "five_crop", "tta_fallback": "true", "tta_budget_s": "1e-6", "tta_budget_strict": "true"}
    refused = post(server, "/classify", image, strict)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "tta_budget_strict" in refused.json()["error"]
    v2 = httpx.post(f"{server.url}/v2/models/{NAME}/infer", timeout=60, json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(photos[0].read_bytes()).decode()]}],
        "parameters": {"tta": "five_crop", "tta_fallback": True, "tta_budget_s": 1e-6, "tta_budget_strict": True}})
    assert v2.status_code == 503 and "retry-after" in v2.headers
    relaxed = post(server, "/classify", image, {**strict, "tta_budget_s": "60"})
    assert relaxed.status_code == 200 and relaxed.json()["tta"] == "five_crop"  # strict only refuses what cannot fit
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    counted = re.search(r'sota_serve_tta_answers_total\{requested="five_crop",served="refused"\} (\S+)', metrics)
    assert counted and float(counted.group(1)) >= 2




def test_the_answer_names_the_policy_served_and_the_one_asked_for(server, photos):
    image = {"image": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    # A budget shorter than any request can take: the ladder serves the cheapest policy.
    degraded = post(server, "/classify", image, {"tta": "five_crop", "tta_fallback": "true", "tta_budget_s": "1e-6"})
    assert degraded.status_code == 200, degraded.text
    assert (degraded.json()["tta"], degraded.json()["requested_tta"]) == ("none", "five_crop")
    plain = post(server, "/classify", image, {"tta": "none"}).json()
    assert degraded.json()["predictions"] == plain["predictions"] and plain["requested_tta"] == "none"
    asked = post(server, "/classify", image, {"tta": "five_crop", "tta_budget_s": "1e-6"}).json()
    assert (asked["tta"], asked["requested_tta"]) == ("five_crop", "five_crop")  # off unless asked

    batch = post(server, "/classify_batch", [("images", ("a.jpg", photos[0].read_bytes(), "image/jpeg"))] * 2,
                 {"tta": "ten_crop", "tta_fallback": "1", "tta_budget_s": "1e-6"}).json()
    assert (batch["tta"], batch["requested_tta"]) == ("none", "ten_crop") and len(batch["results"]) == 2

    v2 = httpx.post(f"{server.url}/v2/models/{NAME}/infer", timeout=60, json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(photos[0].read_bytes()).decode()]}],
        "parameters": {"tta": "five_crop", "tta_fallback": True, "tta_budget_s": 1e-6}})
    assert v2.status_code == 200, v2.text
    assert v2.json()["parameters"] == {"tta": "none", "requested_tta": "five_crop"}

    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    served = re.search(r'sota_serve_tta_answers_total\{requested="five_crop",served="none"\} (\S+)', metrics)
    assert served and float(served.group(1)) >= 2


@pytest.mark.parametrize(("data", "status", "message"), [
    ({"tta_fallback": "sometimes"}, 400, "tta_fallback must be true or false"),
    ({"tta_fallback": "true", "tta_budget_s": "-1"}, 422, "tta_budget_s must be above 0"),
    ({"tta_budget_s": "soon"}, 400, "tta_budget_s must be a number"),
    ({"tta_budget_strict": "perhaps"}, 400, "tta_budget_strict must be true or false"),
])
def test_bad_fallback_fields_get_a_clear_4xx_and_the_server_keeps_serving(server, photos, data, status, message):
    image = {"image": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    answer = post(server, "/classify", image, data)
    assert answer.status_code == status and message in answer.json()["error"]
    assert post(server, "/classify", image).status_code == 200


def test_the_benchmark_weighs_each_served_policys_accuracy_by_its_answers():
    from bench.fallback import expected_accuracy

    card = ModelCard.parse(card_dict(metrics={"accuracy": 0.9, "accuracy_five_crop": 1.0}))
    assert expected_accuracy(card, {"five_crop": 1, "none": 3}) == pytest.approx(0.925)
    assert expected_accuracy(card, {"flip": 1}) is None  # not recorded: no figure rather than a wrong one
    assert expected_accuracy(card, {}) is None
