"""Ranking: the batch's partial ranking (rank_rows) is exactly the stable full sort's head."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sota_serve.predictions import RANKED, rank_rows, top_k_indices, top_k_predictions


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(0, 6), classes=st.integers(1, 40), levels=st.integers(1, 300),
       k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), nans=st.booleans())
def test_rank_rows_equals_the_stable_sort_with_ties_and_nans(rows, classes, levels, k, seed, nans):
    rng = np.random.default_rng(seed)
    # Few levels make ties across the k-th place common (as int8 models' scores tie).
    probs = (rng.integers(0, levels, (rows, classes)) / levels).astype(np.float32)
    if nans and probs.size:
        probs.flat[rng.integers(0, probs.size)] = np.nan
    np.testing.assert_array_equal(rank_rows(probs, k), top_k_indices(probs, min(k, classes)))


def test_a_thousand_classes_rank_as_the_full_sort_and_answers_use_the_ranking():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(1000), size=64).astype(np.float32)
    probs[3, [5, 700, 999]] = probs[3].max() + 0.01  # a three-way tie for first place
    ranked = rank_rows(probs)
    assert ranked.shape == (64, RANKED)
    np.testing.assert_array_equal(ranked, top_k_indices(probs, RANKED))
    assert list(ranked[3, :3]) == [5, 700, 999]
    labels = [f"c{i}" for i in range(1000)]
    for k in (1, 5, RANKED, RANKED + 5):  # more than were ranked: the row is sorted then
        assert top_k_predictions(probs[3], labels, k, ranked[3]) == top_k_predictions(probs[3], labels, k)
