"""Write a model package from a torch classifier and its card (imports torch).

The exported graphs take uint8 NCHW pixels and do the card's normalization and the softmax
themselves, so a lone ``model.onnx`` predicts correctly with no knowledge of fastai's
DataLoaders. After writing, the eager module and every exported file (each through its own
runtime) run the same inputs; the export is refused if they disagree.

Two steps, so that training can evaluate the exported files before their card is final:
:func:`export_graphs` writes the files; :func:`write_package` embeds the card's serving part
in each, hashes them and writes ``card.json`` and ``README.md``, once. :func:`export_package`
does both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from sota_serve.card import ArtifactSpec, ExportRecord, ModelCard
from sota_serve.constants import CARD_FILE, README_FILE
from sota_serve.errors import ExportError
from sota_serve.formats import NAMES as FORMAT_NAMES
from sota_serve.formats import get as get_format
from sota_serve.model_readme import render_readme
from sota_serve.package import sha256_file
from sota_serve.progress import progress

#: Largest |p_eager - p_exported| accepted, per probability.
DEFAULT_TOLERANCE = 1e-4
FORMATS: tuple[str, ...] = FORMAT_NAMES


class Normalize(nn.Module):
    """``(pixels / pixel_scale - mean) / std`` per channel: the card's formula, op for op."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], pixel_scale: float) -> None:
        super().__init__()
        self.pixel_scale = float(pixel_scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / self.pixel_scale - self.mean) / self.std


class ServingModule(nn.Module):
    """uint8 pixels -> normalized float -> classifier -> probabilities (or logits)."""

    def __init__(self, model: nn.Module, card: ModelCard) -> None:
        super().__init__()
        norm = card.normalization
        self.normalize = Normalize(norm.mean, norm.std, norm.pixel_scale)
        self.model = model
        self.softmax = card.output == "probabilities"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        scores = self.model(self.normalize(pixels)).float()
        return scores.softmax(dim=-1) if self.softmax else scores


@dataclass(frozen=True)
class ExportedGraphs:
    """Exported files, checked against the eager module, with no card embedded yet."""

    files: dict[str, Path]
    record: ExportRecord


def export_graphs(
    model: nn.Module,
    card: ModelCard,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    check_inputs: np.ndarray | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportedGraphs:
    """Export ``model`` (an ``nn.Module`` taking normalized float NCHW) in each of ``formats``.

    ``check_inputs``: uint8 (N, 3, H, W) crops used for the parity check (e.g. preprocessed
    real photos); random pixels are added to them.
    """
    if not card.normalization.in_graph:
        raise ExportError("sota-serve exports put normalization in the graph; set in_graph true")
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapper = ServingModule(model, card).eval().cpu()
    h, w = card.input.height, card.input.width
    example = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    files: dict[str, Path] = {}
    notes: dict[str, object] = {}
    with torch.inference_mode(False), torch.no_grad():
        for name in (f for f in FORMATS if f in formats):  # registry order, whatever was asked
            fmt = get_format(name)
            files[name] = out / fmt.file_name
            notes |= fmt.export(wrapper, example, files[name])
        inputs = _check_batch(check_inputs, (h, w))
        diffs = verify_export(wrapper, files, inputs, card, tolerance=tolerance)
    record = ExportRecord(formats=list(files), check_images=int(inputs.shape[0]), max_abs_diff=diffs,
                          tolerance=tolerance, torch=torch.__version__.split("+")[0],
                          onnx=onnx.__version__, **notes)
    return ExportedGraphs(files=files, record=record)


def export_package(model: nn.Module, card: ModelCard, out_dir: str | Path, **options: Any) -> ModelCard:
    """:func:`export_graphs` (``options``: its keywords), then :func:`write_package` with the
    export record added. Returns the card written to card.json."""
    graphs = export_graphs(model, card, out_dir, **options)
    return write_package(out_dir, card.model_copy(update={"export": graphs.record}), graphs.files)


def write_package(out_dir: str | Path, card: ModelCard, files: dict[str, Path]) -> ModelCard:
    """Embed the serving part of ``card`` in each file, hash them, write card.json and
    README.md. The files' bytes depend only on the model and the serving part, so recording
    other measurements later leaves their sha256 unchanged."""
    out = Path(out_dir)
    embedded = card.serving_json()
    artifacts: dict[str, ArtifactSpec] = {}
    for name, path in files.items():
        get_format(name).embed_card(path, embedded)
        artifacts[name] = ArtifactSpec(path=path.name, sha256=sha256_file(path))
    final = ModelCard.parse(card.model_copy(update={"artifacts": artifacts}).to_dict())  # validate once more
    final.save(out / CARD_FILE)
    (out / README_FILE).write_text(render_readme(final), encoding="utf-8")
    return final


def verify_export(
    wrapper: nn.Module,
    files: dict[str, Path],
    inputs: np.ndarray,
    card: ModelCard,
    *,
    tolerance: float,
) -> dict[str, float]:
    """Run eager and each exported file (through its runtime) on ``inputs``; max |diff| per format."""
    reference = wrapper(torch.from_numpy(inputs)).float()
    if card.output == "logits":
        reference = reference.softmax(-1)
    expected = reference.numpy()
    diffs: dict[str, float] = {}
    for name in progress(list(files), desc="export parity check"):
        runtime = get_format(name).open_runtime(files[name].read_bytes(), card, device="cpu",
                                                  intra_op_threads=None)
        got = runtime.predict(inputs)
        diffs[name] = float(np.abs(got - expected).max())
        if not np.isfinite(got).all() or diffs[name] > tolerance:
            raise ExportError(
                f"the exported {name} model disagrees with the eager model: max |p diff| ="
                f" {diffs[name]:.2e} > {tolerance:.0e} on {len(inputs)} inputs. The model may"
                " use an operation that does not export faithfully."
            )
    return diffs


def _check_batch(check_inputs: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(4, 3, *hw), dtype=np.uint8)
    if check_inputs is None or len(check_inputs) == 0:
        return noise
    if check_inputs.dtype != np.uint8 or check_inputs.shape[1:] != (3, *hw):
        raise ExportError(f"check_inputs must be uint8 (N, 3, {hw[0]}, {hw[1]}), got {check_inputs.shape}")
    return np.concatenate([check_inputs, noise])
