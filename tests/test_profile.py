"""Measured costs at their recent tail (sota_serve.serving.profile)."""

from __future__ import annotations

import pytest

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
