"""The API service's request logic, without HTTP: deadline and parameter checks."""

import asyncio
import time

import numpy as np
import pytest
from bentoml.exceptions import BentoMLException

from bento.handlers import RequestHandler
from sota_serve.card import ModelCard
from sota_serve.preprocess import Preprocessor
from tests.helpers import card_dict


def _handler(deadline: float = 1.0) -> RequestHandler:
    card = ModelCard.parse(card_dict())
    return RequestHandler(card, Preprocessor.from_card(card), deadline_s=deadline,
                          chunk={"none": 4, "five_crop": 2})


def test_request_past_its_deadline_is_dropped_not_computed():
    calls = []

    async def run(batch):
        calls.append(len(batch))
        return np.zeros((len(batch), 3), np.float32)

    with pytest.raises(BentoMLException) as e:
        asyncio.run(_handler(0.5).infer(np.zeros((1, 3, 32, 32), np.uint8), run, time.monotonic() - 1))
    assert e.value.error_code == 503 and not calls


def test_slow_inference_times_out_with_503():
    async def run(batch):
        await asyncio.sleep(5)

    with pytest.raises(BentoMLException) as e:
        asyncio.run(_handler(0.2).infer(np.zeros((1, 3, 32, 32), np.uint8), run, time.monotonic()))
    assert e.value.error_code == 503 and "deadline" in str(e.value)


def test_large_requests_are_split_into_batcher_sized_chunks():
    sizes = []

    async def run(batch):
        sizes.append(len(batch))
        return np.zeros((len(batch), 3), np.float32)

    out = asyncio.run(_handler().infer(np.zeros((10, 3, 32, 32), np.uint8), run, time.monotonic()))
    assert out.shape == (10, 3) and sizes == [4, 4, 2]


@pytest.mark.parametrize(("tta", "top_k", "status"), [("bogus", 1, 422), ("none", 0, 422), ("none", 10**6, 422)])
def test_bad_parameters(tta, top_k, status):
    with pytest.raises(BentoMLException) as e:
        _handler().params(tta, top_k)
    assert e.value.error_code == status


def test_top_k_is_clamped_to_the_number_of_labels():
    assert _handler().params("five_crop", 50) == ("five_crop", 3)


def test_a_call_on_a_recycled_connection_is_retried_once():
    attempts = []

    async def flaky(batch):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("Connection closed.")
        return np.ones((len(batch), 3), np.float32)

    out = asyncio.run(_handler().infer(np.zeros((2, 3, 32, 32), np.uint8), flaky, time.monotonic()))
    assert out.shape == (2, 3) and len(attempts) == 2


def test_other_failures_are_not_retried():
    attempts = []

    async def broken(batch):
        attempts.append(1)
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        asyncio.run(_handler().infer(np.zeros((2, 3, 32, 32), np.uint8), broken, time.monotonic()))
    assert len(attempts) == 1
