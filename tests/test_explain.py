"""Occlusion explanations offline and through the serving pipeline's batcher, on a small model
trained here on real scikit-learn digits (real ONNX Runtime, real images)."""

from __future__ import annotations

import asyncio
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sota_serve.classifier import Classifier
from sota_serve.cli import main as cli
from sota_serve.errors import BadRequestError, ImageError, OverloadedError
from sota_serve.explain.heatmap import LEGEND_HEIGHT, MIN_SIDE, colours
from sota_serve.explain.occlusion import (
    cell_edges,
    crop_window,
    neutral_pixel,
    occluded_batch,
    occlusion_map,
    occlusions,
)
from sota_serve.serving.admission import Admission, Ticket
from sota_serve.serving.batcher import DynamicBatcher
from sota_serve.serving.pipeline import Pipeline
from tests.helpers import card_dict, encode

DIGITS = [str(i) for i in range(10)]
TRAIN = 1500  # sklearn's first 1,500 digits train the model; the rest are the test images


def _digit_net():
    """A small conv net whose linear head sees every position (no global pooling), so what it
    looks at is where the ink is."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))


@pytest.fixture(scope="module")
def digits_package(tmp_path_factory) -> Path:
    """The net trained for a few seconds on 64 px renderings of real digits (about 90 % on the
    held-out ones), exported to ONNX with its normalization inside."""
    import torch
    from sklearn.datasets import load_digits

    from sota_serve.building.export import export_package
    from sota_serve.image.preprocess import Preprocessor
    from sota_serve.package.card import ModelCard
    from training.digits import digit_image

    digits = load_digits()
    card = ModelCard.parse(card_dict(name="tiny-digits", labels=DIGITS))
    pre = Preprocessor.from_card(card)
    crops = np.concatenate([pre.plain(digit_image(d)) for d in digits.images[:TRAIN]])
    mean = torch.tensor(card.normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.normalization.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(crops).float() / 255 - mean) / std
    y = torch.from_numpy(digits.target[:TRAIN])
    torch.manual_seed(0)
    net = _digit_net()
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(6):
        for idx in torch.randperm(TRAIN).split(64):
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    out = tmp_path_factory.mktemp("digits-package")
    export_package(net.eval(), card, out, check_inputs=crops[:8], formats=("onnx",))
    return out


@pytest.fixture(scope="module")
def clf(digits_package) -> Classifier:
    return Classifier.open(digits_package, device="cpu")


@pytest.fixture(scope="module")
def held_out() -> list[tuple[bytes, int]]:
    """Held-out digits as PNG bytes (64 x 64) with their true digit."""
    from sklearn.datasets import load_digits

    from training.digits import digit_image

    digits = load_digits()
    return [(encode(digit_image(digits.images[i])), int(digits.target[i])) for i in range(TRAIN, TRAIN + 30)]


# --- the pure parts -------------------------------------------------------------------------

def test_cells_cover_the_crop_exactly_and_only_one_cell_is_covered_per_crop():
    assert cell_edges(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    edges = cell_edges(224, 16)
    assert edges[0] == 0 and edges[-1] == 224 and {b - a for a, b in zip(edges, edges[1:], strict=False)} == {14}
    uneven = cell_edges(37, 5)  # round(i * 37 / 5): 7.4 -> 7, 14.8 -> 15, 22.2 -> 22, 29.6 -> 30
    assert uneven == [0, 7, 15, 22, 30, 37]

    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (1, 3, 37, 30), dtype=np.uint8)
    fill = np.array([124, 116, 104], np.uint8)
    batch = occluded_batch(crop, 5, fill)
    assert batch.shape == (26, 3, 37, 30) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], crop[0])
    rows, cols = cell_edges(37, 5), cell_edges(30, 5)
    covered = np.zeros((37, 30), int)
    for n in range(25):
        i, j = divmod(n, 5)
        changed = batch[1 + n] != crop[0]
        assert (batch[1 + n][:, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] == fill[:, None, None]).all()
        outside = changed.any(0).copy()
        outside[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = False
        assert not outside.any(), f"cell {(i, j)} changed pixels outside itself"
        covered[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] += 1
    assert (covered == 1).all()  # the cells tile the crop


def test_the_patch_is_the_normalization_mean_and_the_map_is_the_drop(clf):
    assert neutral_pixel(clf.card.normalization).tolist() == [124, 116, 104]  # round(255 * ImageNet mean)
    probs = np.full((10, 3), 0.1)
    probs[0, 2], probs[1:, 2] = 0.9, np.linspace(0.0, 0.8, 9)
    heat = occlusion_map(probs, 2, 3)
    assert heat.shape == (3, 3) and heat[0, 0] == pytest.approx(0.9) and heat[2, 2] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="expected 17 rows"):
        occlusion_map(probs, 2, 4)


def test_the_window_is_the_plain_crop_on_the_original(clf):
    pre = clf.preprocessor  # resize the shortest edge to 36, center crop 32
    square = crop_window(pre, 64, 64)
    assert (square.left, square.top, square.width, square.height) == pytest.approx((3.556, 3.556, 56.889, 56.889),
                                                                                   abs=1e-3)
    wide = crop_window(pre, 640, 427)  # resized to 53 x 36 (torchvision truncates): x and y scale apart
    sx, sy = 640 / 53, 427 / 36
    assert (wide.left, wide.top, wide.width, wide.height) == pytest.approx((10 * sx, 2 * sy, 32 * sx, 32 * sy))
    assert 0 <= wide.left and wide.left + wide.width <= 640 and wide.top + wide.height <= 427


def test_colour_scale_runs_dark_to_bright():
    ramp = colours(np.linspace(0, 1, 50)).astype(int)
    assert ramp.shape == (50, 3) and ramp[0].tolist() == [0, 0, 4] and ramp[-1].tolist() == [252, 255, 164]
    lightness = ramp @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(lightness) > 0).all()  # reads in order, in greyscale too


# --- offline --------------------------------------------------------------------------------

def test_the_model_reads_digits(clf, held_out):
    probs = clf.probabilities([data for data, _ in held_out])
    assert (probs.argmax(1) == [digit for _, digit in held_out]).mean() >= 0.8


def test_one_batch_equals_one_occlusion_at_a_time(clf, held_out):
    data, _ = held_out[0]
    explained = clf.explain(data, grid=6)
    occluded = occlusions(clf.preprocessor, clf.card.normalization, data, grid=6, label=None)
    single = np.concatenate([clf.runtime.predict(occluded.rows(n, n + 1)) for n in range(37)])
    one_by_one = occlusion_map(single, DIGITS.index(explained.label), 6)
    assert np.abs(np.asarray(explained.grid) - one_by_one).max() < 1e-5
    assert explained.label == DIGITS[int(single[0].argmax())] and explained.score == pytest.approx(single[0].max())


def _covered_on_the_original(data: bytes, window, grid: int, cell: tuple[int, int], fill: np.ndarray) -> bytes:
    """``data`` with the region of the original image under crop cell ``cell`` painted ``fill``."""
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    size = 32  # the crop's side
    rows, cols = cell_edges(size, grid), cell_edges(size, grid)
    i, j = cell
    sx, sy = window.width / size, window.height / size
    top, bottom = round(window.top + rows[i] * sy), round(window.top + rows[i + 1] * sy)
    left, right = round(window.left + cols[j] * sx), round(window.left + cols[j + 1] * sx)
    img[top:bottom, left:right] = fill
    return encode(Image.fromarray(img))


def test_covering_the_most_important_cell_costs_more_than_the_least(clf, held_out):
    """Faithfulness, checked outside the map's own arithmetic: the cells the map rates most and
    least important are covered on the uploaded image itself (through the window), and the
    image is classified again from its bytes."""
    fill = neutral_pixel(clf.card.normalization)
    held, drops = 0, []
    for data, _ in held_out[:20]:
        explained = clf.explain(data, grid=4)
        heat = np.asarray(explained.grid)
        label = DIGITS.index(explained.label)
        most = np.unravel_index(heat.argmax(), heat.shape)
        least = np.unravel_index(heat.argmin(), heat.shape)
        images = [_covered_on_the_original(data, explained.window, 4, cell, fill) for cell in (most, least)]
        p_most, p_least = clf.probabilities(images, "none")[:, label]
        held += p_most < p_least
        drops.append((explained.score - p_most, explained.score - p_least))
    mean_most, mean_least = np.mean(drops, axis=0)
    assert held >= 16, f"held for {held} of 20 images"
    assert mean_most > mean_least + 0.1, (mean_most, mean_least)


def test_label_and_grid_are_checked_before_any_work(clf, held_out):
    data, digit = held_out[1]
    assert clf.explain(data, label=str(digit), grid=2).label == str(digit)
    with pytest.raises(BadRequestError, match=r"unknown label 'cat'; this model's labels are 0, 1, 2"):
        clf.explain(data, label="cat")
    for grid in (1, 17, 2.5, True):
        with pytest.raises(BadRequestError, match=r"grid must be an integer in 2\.\.16") as e:
            clf.explain(data, grid=grid)  # type: ignore[arg-type]
        assert e.value.http_status == 422
    with pytest.raises(ImageError):
        clf.explain(b"plain text, not an image")


# --- through the server's batcher -----------------------------------------------------------

class _TogetherBatcher(DynamicBatcher):
    """A real batcher whose submissions wait until ``together`` have arrived, so that requests
    the test starts at once are queued at once however slowly the decode threads get to them on
    a loaded machine."""

    def __init__(self, *args, together: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.together, self.arrived, self.all_here = together, 0, asyncio.Event()

    async def submit(self, *args, **kwargs):
        self.arrived += 1
        if self.arrived >= self.together:
            self.all_here.set()
        await self.all_here.wait()
        return await super().submit(*args, **kwargs)


def test_the_pipeline_batches_explanations_and_releases_what_admission_charged(clf, held_out):
    offline = [clf.explain(data, grid=5) for data, _ in held_out[:3]]

    async def main():
        admission = Admission(max_wait_s=10, max_in_flight=64, decode_threads=2)
        batcher = _TogetherBatcher(clf.runtime, max_crops=64, annotate=lambda crops, k, tta: clf.ood(crops, tta), together=3)
        pipeline = Pipeline(clf, batcher, admission, decode_threads=2, deadline_s=30)
        tickets = [Ticket() for _ in held_out[:3]]
        jobs = [pipeline.explain(data, None, 5, ticket) for (data, _), ticket in zip(held_out[:3], tickets, strict=True)]
        answers = await asyncio.gather(*jobs)
        with pytest.raises(BadRequestError):
            await pipeline.explain(held_out[0][0], "cat", 5, Ticket())
        with pytest.raises(ImageError):
            await pipeline.explain(b"not an image", None, 5, Ticket())
        batcher.close()
        return answers, tickets, admission.pending_crops, batcher.batches

    answers, tickets, pending, batches = asyncio.run(main())
    for got, want in zip(answers, offline, strict=True):
        assert got.label == want.label and got.window == want.window
        assert np.abs(np.asarray(got.grid) - np.asarray(want.grid)).max() < 1e-5
    assert pending == 0 and all(t.crops == 0 for t in tickets)
    assert batches == 2  # 3 x 26 crops, at most 64 a call: queued together, they share calls


def test_explanations_in_flight_hold_a_bounded_number_of_occluded_crops(clf, held_out):
    """32 grid-16 explanations at once (8,224 crops, 101 MB of them at 64 px) through the
    server's pipeline: the memory numpy allocates meanwhile (tracemalloc, which numpy reports
    its buffers to) stays within the crop budget, the batcher's joined copies and one plain crop
    per explanation, plus 4 MiB for everything else; the maps are those of one batch."""
    images = [data for data, _ in held_out[:8]]
    offline = [clf.explain(data, grid=16) for data in images[:2]]
    crop_bytes = 3 * clf.card.input.height * clf.card.input.width

    async def main():
        admission = Admission(max_wait_s=3600, max_in_flight=64, decode_threads=2)
        batcher = DynamicBatcher(clf.runtime, max_crops=32, model_threads=2)
        pipeline = Pipeline(clf, batcher, admission, decode_threads=2, deadline_s=3600)
        await pipeline.explain(images[0], None, 16, Ticket())  # threads and runtime warm
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            answers = await asyncio.gather(*[pipeline.explain(images[i % 8], None, 16, Ticket()) for i in range(32)])
            grown = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        batcher.close()
        return answers, grown, pipeline.explain_budget, admission.pending_crops

    answers, grown, budget, pending = asyncio.run(main())
    assert budget.capacity == 2 * 2 * 32  # two plain batches per model thread
    assert budget.peak == budget.capacity and budget.in_use == 0 and pending == 0
    bound = (budget.capacity + 2 * 32 + 32) * crop_bytes + 4 * 1024 * 1024
    assert grown < bound, f"{grown / 2**20:.1f} MiB allocated while 32 explanations ran, bound {bound / 2**20:.1f} MiB"
    for got, want in zip(answers[:2], offline, strict=True):
        assert got.label == want.label and np.abs(np.asarray(got.grid) - np.asarray(want.grid)).max() < 1e-5


def test_an_explanation_past_its_deadline_gives_its_crops_back(clf, held_out):
    async def main():
        admission = Admission(max_wait_s=10, max_in_flight=64, decode_threads=2)
        batcher = DynamicBatcher(clf.runtime, max_crops=16)
        pipeline = Pipeline(clf, batcher, admission, decode_threads=2, deadline_s=1e-6)
        ticket = Ticket()
        with pytest.raises(OverloadedError, match="deadline"):
            await pipeline.explain(held_out[0][0], None, 8, ticket)  # 65 crops: 5 slices of at most 16
        await asyncio.sleep(0.1)  # the slices cancelled after the first failure finish unwinding
        batcher.close()
        return pipeline.explain_budget, admission.pending_crops, ticket

    budget, pending, ticket = asyncio.run(main())
    assert budget.capacity == 32 and budget.in_use == 0 and budget.peak > 0
    assert pending == 0 and ticket.crops == 0


# --- the command line ----------------------------------------------------------------------

def test_cli_prints_the_map_and_writes_the_png(digits_package, held_out, tmp_path, capsys):
    data, _ = held_out[2]
    image = tmp_path / "digit.png"
    image.write_bytes(data)
    out = tmp_path / "heat.png"
    assert cli(["explain", str(digits_package), str(image), "--grid", "4", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "label" in text and text.count("\n  ") >= 4 and f"wrote {out}" in text
    assert cli(["explain", str(digits_package), str(image), "--grid", "4", "--json", "--device", "cpu"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["grid"]) == 4 and all(len(row) == 4 for row in answer["grid"])
    w = answer["window"]
    side = round(w["left"] + w["width"]) - round(w["left"])  # 57 px of the 64 px digit
    factor = -(-MIN_SIDE // side)
    png = Image.open(out)
    assert png.format == "PNG" and png.size == (side * factor, side * factor + LEGEND_HEIGHT)
    assert cli(["explain", str(digits_package), str(image), "--label", "cat", "--device", "cpu"]) == 2
    assert "unknown label 'cat'" in capsys.readouterr().err


# --- the form of POST /explain --------------------------------------------------------------

def test_the_form_reads_label_and_grid_as_the_other_routes_read_values():
    from sota_serve.contract.requests import ExplainForm
    from sota_serve.errors import BadRequestError, MalformedRequestError
    from sota_serve.http.form import read_form
    from sota_serve.http.multipart import Part

    def explain_form(parts):
        form = read_form(ExplainForm, parts, "/explain")
        return form.image, form.label, form.grid

    image = Part("image", True, b"bytes")
    assert explain_form([image]) == (b"bytes", None, 8)
    assert explain_form([image, Part("label", False, b"7"), Part("grid", False, b" 4 ")]) == (b"bytes", "7", 4)
    assert explain_form([image, Part("label", False, b'"cat"'), Part("grid", False, b"12")])[1] == "cat"
    assert explain_form([image, Part("label", False, b"null")])[1] == "null"  # the text sent
    for parts, message in (([], "one 'image' file, got 0"), ([image, image], "one 'image' file, got 2"),
                           ([image, Part("grid", False, b"eight")], "grid must be an integer"),
                           ([image, Part("grid", False, b"true")], "grid must be an integer")):
        with pytest.raises(MalformedRequestError, match=message):
            explain_form(parts)
    with pytest.raises(BadRequestError, match="grid must be an integer in 2..16"):  # 422, as the pipeline says
        explain_form([image, Part("grid", False, b"17")])
