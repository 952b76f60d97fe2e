"""The in-process batcher and the admission policy, on a real exported model (ONNX Runtime)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sota_serve.classifier import Classifier
from sota_serve.errors import BadRequestError, BudgetExceededError, OverloadedError
from sota_serve.http.errors import error_answer
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import ModelPackage, open_package
from sota_serve.predictions import check_top_k, top_k_indices
from sota_serve.runtime import load_runtime
from sota_serve.serving.admission import Admission, Ticket
from sota_serve.serving.batcher import DynamicBatcher, _runs
from sota_serve.serving.pipeline import Pipeline
from tests.helpers import card_dict


class CountingRuntime:
    """The real runtime, with every device call's shape recorded."""

    def __init__(self, runtime, delay_s: float = 0.0) -> None:
        self.runtime, self.delay_s, self.calls = runtime, delay_s, []
        self.active = self.most_at_once = 0
        self._lock = threading.Lock()

    def predict(self, x: np.ndarray, *, crops_per_image: int = 1) -> np.ndarray:
        with self._lock:
            self.calls.append((x.shape[0], crops_per_image))
            self.active += 1
            self.most_at_once = max(self.most_at_once, self.active)
        try:
            time.sleep(self.delay_s)  # holds the model thread, so that later requests queue up
            return self.runtime.predict(x, crops_per_image=crops_per_image)
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(scope="module")
def runtime(tiny_package):
    return load_runtime(open_package(tiny_package), "onnx", device="cpu")


@pytest.fixture(scope="module")
def crops(tiny_package, photos):
    """(3 photos, 5 crops, 3, 32, 32) uint8 and (3, 3, 32, 32) uint8 of the real photos."""
    pre = Preprocessor.from_card(open_package(tiny_package).card)
    data = [p.read_bytes() for p in photos]
    return np.stack([pre(d, "five_crop") for d in data]), np.concatenate([pre(d) for d in data])


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_device_calls_and_get_their_own_rows(runtime, crops):
    _, plain = crops
    counting = CountingRuntime(runtime, delay_s=0.05)

    async def main():
        batcher = DynamicBatcher(counting, max_crops=64)
        deadline = time.monotonic() + 30
        jobs = [batcher.submit(plain[i % 3][None], 1, deadline) for i in range(24)]
        return await asyncio.gather(*jobs)

    results = _run(main())
    expected = runtime.predict(plain)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.probs[0], expected[i % 3], atol=1e-6)
        np.testing.assert_array_equal(r.ranked[0], top_k_indices(r.probs[0], 3))  # ranked on the model thread
    assert sum(n for n, _ in counting.calls) == 24
    assert len(counting.calls) < 24 and max(n for n, _ in counting.calls) > 1, counting.calls


def test_plain_and_five_crop_requests_batch_apart_and_stay_exact(runtime, crops):
    five, plain = crops
    counting = CountingRuntime(runtime, delay_s=0.02)

    async def main():
        batcher = DynamicBatcher(counting, max_crops=64)
        deadline = time.monotonic() + 30
        jobs = []
        for i in range(6):
            jobs.append(batcher.submit(plain[i % 3][None], 1, deadline))
            jobs.append(batcher.submit(five[i % 3], 5, deadline))
        return await asyncio.gather(*jobs)

    results = _run(main())
    plain_expected = runtime.predict(plain)
    five_expected = runtime.predict(five.reshape(-1, 3, 32, 32), crops_per_image=5)
    for i in range(6):
        np.testing.assert_allclose(results[2 * i].probs[0], plain_expected[i % 3], atol=1e-6)
        np.testing.assert_allclose(results[2 * i + 1].probs[0], five_expected[i % 3], atol=1e-6)
    assert all(n % k == 0 for n, k in counting.calls)
    assert {k for _, k in counting.calls} == {1, 5}


def test_a_request_larger_than_a_batch_is_split_on_image_boundaries(runtime, crops):
    five, _ = crops
    counting = CountingRuntime(runtime)
    x = np.concatenate([five, five, five, five]).reshape(-1, 3, 32, 32)  # 12 images, 60 crops

    async def main():
        return await DynamicBatcher(counting, max_crops=12).submit(x, 5, time.monotonic() + 30)

    out = _run(main())
    assert out.probs.shape == (12, 3) and out.ranked.shape == (12, 3)
    np.testing.assert_allclose(out.probs, runtime.predict(x, crops_per_image=5), atol=1e-6)
    assert [n for n, _ in counting.calls] == [10] * 6  # 2 whole images (10 crops) per call


def test_a_request_in_parts_is_joined_on_the_model_thread_and_split_between_images(runtime, crops):
    five, _ = crops
    counting = CountingRuntime(runtime)
    parts = [five[i % 3] for i in range(7)]  # 7 images of 5 crops, as the decode threads hand them over
    loop_thread = threading.get_ident()
    joined_on = []
    original = counting.predict

    def predict(x, *, crops_per_image=1):
        joined_on.append(threading.get_ident())
        return original(x, crops_per_image=crops_per_image)

    counting.predict = predict

    async def main():
        return await DynamicBatcher(counting, max_crops=15).submit(parts, 5, time.monotonic() + 30)

    out = _run(main())
    np.testing.assert_allclose(out.probs, runtime.predict(np.concatenate(parts), crops_per_image=5), atol=1e-6)
    assert [n for n, _ in counting.calls] == [15, 15, 5]  # 3 images a call, the last alone
    assert loop_thread not in joined_on


def test_annotations_are_computed_per_batch_on_the_model_thread_and_follow_their_images(runtime, crops):
    five, _ = crops
    seen = []

    def annotate(x, k, policy):  # e.g. the OOD check: one value per image, from the batch's joined crops
        assert policy == "five_crop"
        seen.append((threading.get_ident(), x.shape[0], k))
        return [int(x[i * k:(i + 1) * k].sum()) for i in range(x.shape[0] // k)]

    async def main():
        batcher = DynamicBatcher(CountingRuntime(runtime, delay_s=0.02), max_crops=10, annotate=annotate)
        deadline = time.monotonic() + 30
        jobs = [batcher.submit(five[i % 3], 5, deadline, "five_crop") for i in range(4)]  # 2 images a call
        jobs.append(batcher.submit([five[0], five[1], five[2]], 5, deadline, "five_crop"))  # split over calls
        return await asyncio.gather(*jobs)

    results = _run(main())
    for i, r in enumerate(results[:4]):
        assert r.notes == [int(five[i % 3].sum())]
    assert results[4].notes == [int(five[j].sum()) for j in range(3)]
    assert all(k == 5 and n % 5 == 0 and n <= 10 for _, n, k in seen)
    assert threading.get_ident() not in {t for t, _, _ in seen}


def test_policies_with_the_same_crop_count_batch_apart_and_keep_their_names(runtime, crops):
    # Two policies of five crops each (the same group size): each batch holds one policy, and
    # the annotator (the OOD check, fitted per policy) is told which.
    five, _ = crops
    seen = []

    def annotate(x, k, policy):
        seen.append((policy, x.shape[0] // k))
        return [policy] * (x.shape[0] // k)

    async def main():
        batcher = DynamicBatcher(CountingRuntime(runtime, delay_s=0.02), max_crops=50, annotate=annotate)
        deadline = time.monotonic() + 30
        jobs = [batcher.submit(five[i % 3], 5, deadline, ("five_crop", "corners")[i % 2]) for i in range(8)]
        return await asyncio.gather(*jobs)

    results = _run(main())
    assert [r.notes for r in results] == [[("five_crop", "corners")[i % 2]] for i in range(8)]
    assert {p for p, _ in seen} == {"five_crop", "corners"}


def test_runs_cut_long_arrays_into_views_between_images():
    a, b = np.arange(24).reshape(12, 2), np.arange(4).reshape(2, 2)
    runs = _runs([a, b], step=4)
    assert [[p.shape[0] for p in run] for run in runs] == [[4], [4], [4], [2]]
    assert all(np.shares_memory(p, a) for run in runs[:3] for p in run)  # no copies
    assert [[p.shape[0] for p in run] for run in _runs([b, b, b], step=4)] == [[2, 2], [2]]
    assert _runs([], step=4) == []


def test_a_request_past_its_deadline_is_dropped_not_computed(runtime, crops):
    _, plain = crops
    counting = CountingRuntime(runtime)

    async def main():
        return await DynamicBatcher(counting, max_crops=8).submit(plain[:1], 1, time.monotonic() - 0.1)

    with pytest.raises(OverloadedError, match="deadline"):
        _run(main())
    assert counting.calls == []


def _stall_mix(runtime, crops, mix):
    """One plain request holds the only model thread while ``mix`` is queued behind it: each
    entry is (queue, state) with queue 0 plain, 1 flip, 2 five-crop and state expired (its
    deadline passes while it waits), cancelled (its caller goes away) or live. Returns what
    each live entry got, waiting for nothing but the batcher itself."""
    five, plain = crops
    counting = CountingRuntime(runtime, delay_s=0.15)
    shapes = {0: (plain[:1], 1, "none"), 1: (np.repeat(plain[:1], 2, axis=0), 2, "flip"),
              2: (five[0], 5, "five_crop")}

    async def main():
        batcher = DynamicBatcher(counting, max_crops=64)
        first = asyncio.ensure_future(batcher.submit(plain[:1], 1, time.monotonic() + 30))
        await asyncio.sleep(0.03)  # the first request is on the model thread
        live, doomed = [], []
        for queue, state in mix:
            x, k, policy = shapes[queue]
            deadline = time.monotonic() + (0.05 if state == "expired" else 30)
            job = asyncio.ensure_future(batcher.submit(x, k, deadline, policy))
            await asyncio.sleep(0)  # queued in this order
            (live if state == "live" else doomed).append((job, state))
        for job, state in doomed:
            if state == "cancelled":
                job.cancel()
        # No further submission: the live items must be answered by the batcher alone.
        answers = await asyncio.wait_for(asyncio.gather(*(job for job, _ in live)), timeout=10)
        await first
        for job, state in doomed:
            if state == "expired":
                with pytest.raises(OverloadedError):
                    await job
        batcher.close()
        return answers

    return _run(main())


def test_a_live_request_behind_a_dead_queue_is_answered_while_the_model_is_idle(runtime, crops):
    """A five-crop request expires in its queue while the model runs a plain one; the plain
    request queued after it must still run, not wait for somebody else's submission."""
    answers = _stall_mix(runtime, crops, [(2, "expired"), (0, "live")])
    np.testing.assert_allclose(answers[0].probs[0], runtime.predict(crops[1][:1])[0], atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["expired", "cancelled", "live"])),
                min_size=1, max_size=8))
def test_after_any_mix_of_dead_and_live_items_every_live_item_is_answered(runtime, crops, mix):
    answers = _stall_mix(runtime, crops, mix)
    assert len(answers) == sum(state == "live" for _, state in mix)
    assert all(a.probs.shape == (1, 3) for a in answers)


def test_a_strict_item_that_cannot_make_its_due_time_is_refused_at_dispatch_not_run(runtime, crops):
    """Clockwork's rule: work that cannot meet its deadline is dropped before it runs. A
    strict item waits behind a 0.3 s call; when it reaches the model its own call (0.3 s at
    the measured tail) would end past its due time, so it is refused and never computed,
    while a request without a strict budget in the same queue is answered."""
    _, plain = crops
    counting = CountingRuntime(runtime, delay_s=0.3)

    async def main():
        batcher = DynamicBatcher(counting, max_crops=1)  # one crop a call: each item its own call
        batcher.profile.add(1, 0.3)
        first = asyncio.ensure_future(batcher.submit(plain[:1], 1, time.monotonic() + 30))
        await asyncio.sleep(0.05)
        strict = asyncio.ensure_future(batcher.submit(plain[1:2], 1, time.monotonic() + 30, due=time.monotonic() + 0.4))
        late = asyncio.ensure_future(batcher.submit(plain[2:3], 1, time.monotonic() + 30))
        await first
        with pytest.raises(BudgetExceededError, match="budget"):
            await strict
        answer = await late
        batcher.close()
        return answer

    answer = _run(main())
    np.testing.assert_allclose(answer.probs[0], runtime.predict(plain[2:3])[0], atol=1e-6)
    assert [n for n, _ in counting.calls] == [1, 1]  # the first and the late one; never the strict one


def test_a_failing_batch_fails_its_requests_only(runtime, crops):
    _, plain = crops

    class Flaky(CountingRuntime):
        def predict(self, x, *, crops_per_image=1):
            if not self.calls:
                self.calls.append("boom")
                raise RuntimeError("device lost")
            return super().predict(x, crops_per_image=crops_per_image)

    async def main():
        batcher = DynamicBatcher(Flaky(runtime), max_crops=8)
        deadline = time.monotonic() + 30
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.submit(plain[:1], 1, deadline)
        return await batcher.submit(plain[:1], 1, deadline)

    assert _run(main()).probs.shape == (1, 3)


@pytest.mark.parametrize("model_threads", [1, 2, 3])
def test_model_threads_run_that_many_batches_at_once_and_stay_exact(tiny_package, crops, model_threads):
    """One ORT session called from several threads at once (single-threaded calls, as the
    server runs them on a CPU): every request still gets its own exact rows."""
    five, plain = crops
    runtime = load_runtime(open_package(tiny_package), "onnx", device="cpu", intra_op_threads=1)
    counting = CountingRuntime(runtime, delay_s=0.03)

    async def main():
        batcher = DynamicBatcher(counting, max_crops={1: 4, 5: 10}, model_threads=model_threads)
        deadline = time.monotonic() + 30
        jobs = [batcher.submit(plain[i % 3][None], 1, deadline) if i % 4 else
                batcher.submit(five[i % 3], 5, deadline) for i in range(40)]
        return await asyncio.gather(*jobs)

    results = _run(main())
    expected_plain, expected_five = runtime.predict(plain), runtime.predict(five.reshape(-1, *plain.shape[1:]),
                                                                               crops_per_image=5)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.probs[0], (expected_five if i % 4 == 0 else expected_plain)[i % 3], atol=1e-6)
    assert counting.most_at_once == model_threads
    assert sum(n // k for n, k in counting.calls) == 40


def test_model_time_per_crop_is_measured(runtime, crops):
    _, plain = crops
    batcher_holder = {}

    async def main():
        batcher = batcher_holder["b"] = DynamicBatcher(runtime, max_crops=8)
        await batcher.submit(plain, 1, time.monotonic() + 30)

    _run(main())
    assert batcher_holder["b"].seconds_per_crop.value > 0 and batcher_holder["b"].batches == 1


# --- admission ---------------------------------------------------------------------------


def test_admission_sheds_when_the_queue_cannot_drain_in_time():
    adm = Admission(max_wait_s=1.0, max_in_flight=1000, decode_threads=2)
    adm.seconds_per_crop.add(0.1)  # 10 crops/s
    tickets = []
    with pytest.raises(OverloadedError) as refused:
        while True:
            tickets.append(adm.enter(0))
            adm.charge(tickets[-1], 1)
    assert len(tickets) == 11  # 10 queued crops drain in 1.0 s; the 11th makes it 1.1 s
    assert refused.value.retry_after_s == 2 and "SOTA_SERVE_MAX_WAIT_S" in str(refused.value)
    assert refused.value.http_status == 503
    for ticket in tickets[:5]:
        adm.computed(ticket)
        adm.leave(ticket)
    assert adm.enter(0) and adm.shed == 1


def test_admission_counts_model_calls_that_run_at_once():
    """Two model threads drain the same queue in half the time: twice the crops get in."""
    admitted = {}
    for model_threads in (1, 2):
        adm = Admission(max_wait_s=1.0, max_in_flight=1000, decode_threads=2, model_threads=model_threads)
        adm.seconds_per_crop.add(0.1)  # per crop and call; calls overlap
        with pytest.raises(OverloadedError):
            while True:
                adm.charge(adm.enter(0), 1)
        admitted[model_threads] = adm.in_flight
    assert admitted == {1: 11, 2: 21}


def test_admission_caps_requests_in_flight_whatever_the_estimates():
    adm = Admission(max_wait_s=100.0, max_in_flight=3, decode_threads=1)
    tickets = [adm.enter(0) for _ in range(3)]
    with pytest.raises(OverloadedError) as refused:
        adm.enter(0)
    assert refused.value.retry_after_s >= 1 and "SOTA_SERVE_MAX_IN_FLIGHT" in str(refused.value)
    adm.leave(tickets[0])
    assert adm.enter(0)


def test_a_held_request_gets_in_when_another_leaves_and_is_refused_when_none_does():
    async def main():
        adm = Admission(max_wait_s=1.0, max_in_flight=100, decode_threads=1)
        adm.seconds_per_crop.add(0.6)
        first = await adm.wait_enter(0, hold_s=5)
        adm.charge(first, 2)  # 1.2 s queued: the door is closed
        started = time.monotonic()
        held = asyncio.ensure_future(adm.wait_enter(0, hold_s=5))
        await asyncio.sleep(0.05)
        assert not held.done()
        adm.leave(first)
        second = await held  # admitted by the leave, not after the 5 s hold
        assert time.monotonic() - started < 1 and adm.in_flight == 1 and adm.shed == 0
        adm.charge(second, 2)
        with pytest.raises(OverloadedError) as refused:
            await adm.wait_enter(0, hold_s=0.1)  # nobody leaves: refused after the hold
        assert refused.value.retry_after_s == 2 and adm.shed == 1
        with pytest.raises(OverloadedError):
            await adm.wait_enter(0, hold_s=0)  # no hold: refused at once
        assert adm.shed == 2 and not adm._waiters

    _run(main())


def test_a_burst_is_charged_at_the_door_before_any_of_it_is_decoded():
    # The bytes a request declares count at once: 48 simultaneous big uploads must not all
    # be admitted just because none of them has reached the decoder yet.
    adm = Admission(max_wait_s=0.22, max_in_flight=1000, decode_threads=2)
    adm.learn_decode(1_000_000, 0.04)  # 40 ms per MB of upload on one thread
    admitted = []
    for _ in range(48):
        try:
            admitted.append(adm.enter(2_500_000))  # 50 ms of two threads each
        except OverloadedError:
            pass
    assert len(admitted) == 5 and adm.shed == 43  # the 5th starts at 0.2 s, the 6th would at 0.25 s
    assert adm.drain_s() == pytest.approx(0.25)


def test_a_ticket_releases_exactly_what_is_left_of_it():
    adm = Admission(max_wait_s=10.0, max_in_flight=10, decode_threads=2)
    adm.learn_decode(1000, 0.5)
    adm.seconds_per_crop.add(0.1)
    ticket = adm.enter(100)
    adm.resize(ticket, 4000)  # the body was bigger than declared
    adm.charge(ticket, 5)
    assert adm.drain_s() == pytest.approx(4000 * 0.0005 / 2)  # decoding is the slower stage
    adm.decoded(ticket)
    assert adm.drain_s() == pytest.approx(0.5)
    adm.leave(ticket)  # crops not reported computed (an error path): still released
    assert (adm.pending_bytes, adm.pending_crops, adm.in_flight, adm.drain_s()) == (0, 0, 0, 0.0)


# --- request parameters (no HTTP) ---------------------------------------------------------


def _pipeline(card: ModelCard | None = None) -> Pipeline:
    card = card or ModelCard.parse(card_dict())
    clf = Classifier(ModelPackage(card=card, artifacts={}), runtime=None, preprocessor=Preprocessor.from_card(card))  # type: ignore[arg-type]
    adm = Admission(max_wait_s=10, max_in_flight=10, decode_threads=1)
    return Pipeline(clf, batcher=None, admission=adm, decode_threads=1, deadline_s=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("tta", "top_k"), [("bogus", 1), ("none", 0), ("none", 10**6)])
def test_bad_parameters_are_422(tta, top_k):
    pipeline = _pipeline()
    with pytest.raises(BadRequestError) as e:
        pipeline.policy(tta, 1, Ticket(), None)
        check_top_k(top_k, pipeline.card.num_classes)
    assert e.value.http_status == 422


def test_top_k_is_clamped_to_the_number_of_labels():
    assert check_top_k(50, _pipeline().card.num_classes) == 3


def test_an_omitted_tta_is_the_cards_default():
    assert _pipeline().policy(None, 1, Ticket(), None) == ("none", "none")
    card = ModelCard.parse(card_dict(tta={"default": "flip", "flip": {"resize_shortest_edge": 36}}))
    assert _pipeline(card).policy(None, 1, Ticket(), None) == ("flip", "flip")


def test_overload_answers_carry_retry_after():
    status, headers, body = error_answer(OverloadedError("busy", retry_after_s=7))
    assert status == 503 and headers["Retry-After"] == "7"
    assert json.loads(body) == {"error": "busy"}


def test_a_cold_pipeline_seeds_the_decode_cost_before_the_first_request():
    pipeline = _pipeline()
    assert pipeline.admission.seconds_per_byte.value is None
    pipeline.calibrate(repeats=1)
    assert 0 < pipeline.admission.seconds_per_byte.value < 1e-5  # well under 10 s per MB
    assert pipeline.admission.pending_bytes == 0
