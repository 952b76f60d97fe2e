"""Measured costs at their recent tail (sota_serve.serving.profile)."""

from __future__ import annotations

import time

import pytest

from sota_serve.errors import BudgetExceededError
from sota_serve.serving.admission import (
    FORECAST_HORIZON_S,
    FORECAST_QUANTILE,
    FORECAST_SAMPLES,
    Admission,
    Ticket,
)
from sota_serve.serving.fallback import Ladder
from sota_serve.serving.profile import LatencyProfile, RecentTail, size_class


def test_the_tail_is_a_high_quantile_of_the_recent_samples_only():
    tail = RecentTail(size=20, quantile=0.95)
    assert tail.value is None
    for _ in range(19):
        tail.add(1.0)
    tail.add(9.0)
    assert tail.value == 9.0  # one slow sample in twenty is the 95th percentile
    for _ in range(20):
        tail.add(2.0)  # the slow one has left the window
    assert tail.value == 2.0 and len(tail) == 20
    with pytest.raises(ValueError):
        RecentTail(quantile=0)


def test_calls_are_profiled_per_size_class_and_read_from_the_nearest_measured_one():
    assert [size_class(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]
    profile = LatencyProfile()
    assert profile.run_s(4) is None
    profile.add(8, 0.08)  # 10 ms a crop in calls of 5-8 crops
    profile.add(1, 0.05)  # 50 ms for a lone crop
    assert profile.run_s(6) == pytest.approx(0.06)
    assert profile.run_s(1) == pytest.approx(0.05)
    assert profile.run_s(2) == pytest.approx(0.10)  # nearest measured: the single crop's cost
    assert profile.run_s(64) == pytest.approx(0.64)  # nearest measured: 8 crops
    assert profile.per_crop_s(3) == pytest.approx(0.01)  # class 4: nearer 8 than 1
    profile.add(2, 0.06)  # 30 ms a crop in calls of 2
    assert profile.per_crop_s(3) == pytest.approx(0.03)  # class 4 is as near 2 as 8: the smaller, dearer one


def test_samples_older_than_the_horizon_no_longer_count():
    tail = RecentTail(size=512, quantile=0.99, horizon_s=0.2)
    for _ in range(10):
        tail.add(5.0)  # a burst long past
    assert tail.value == 5.0
    time.sleep(0.3)
    assert tail.value is None and len(tail) == 0  # nothing recent: no correction at all
    tail.add(0.1)
    assert tail.value == 0.1
    assert RecentTail().horizon_s is None  # the stage costs keep their last samples however old


def test_a_strict_budget_cannot_lock_itself_out_with_an_old_miss():
    """Forecast misses expire: a strict server that refuses everything while a big miss is
    remembered would never answer again, since only answers teach it otherwise."""
    adm = Admission(max_wait_s=10, max_in_flight=10, decode_threads=1)
    assert adm.forecast_miss.horizon_s == FORECAST_HORIZON_S <= 30
    adm.forecast_miss = RecentTail(size=FORECAST_SAMPLES, quantile=FORECAST_QUANTILE, horizon_s=0.2)
    for _ in range(20):
        adm.learn_ready(Ticket(forecast=(time.monotonic() - 60, 0.0)))  # a minute late
    ladder = Ladder(("none", "five_crop"), adm, enabled=True, budget_s=1.0, strict=True)
    with pytest.raises(BudgetExceededError):
        ladder.choose("five_crop", 1, Ticket(), None)
    time.sleep(0.3)
    assert ladder.choose("five_crop", 1, Ticket(), None) == "five_crop"
