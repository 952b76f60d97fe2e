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

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from sota_serve.building.agreement import agreement
from sota_serve.building.calibration import batches
from sota_serve.building.model_readme import render_readme
from sota_serve.constants import CARD_FILE, README_FILE
from sota_serve.errors import ExportError
from sota_serve.formats import NAMES as FORMAT_NAMES
from sota_serve.formats import REGISTRY as FORMAT_REGISTRY
from sota_serve.formats import get as get_format
from sota_serve.package import precision
from sota_serve.package.card import ArtifactSpec, ExportRecord, ModelCard, PrecisionParity
from sota_serve.package.loading import sha256_file
from sota_serve.progress import progress, step
from sota_serve.runtime import open_runtime

#: Largest |p_eager - p_exported| accepted, per probability.
DEFAULT_TOLERANCE = 1e-4
#: The same for fp16 files against the fp32 eager module: loose, only to catch a broken
#: export; whether fp16 is good enough to serve is the top-1 agreement in the card's ``fp16``.
FP16_TOLERANCE = 0.05
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
    """uint8 pixels -> normalized float -> classifier -> probabilities (or logits).

    ``half``: the classifier runs in fp16 on a half copy of its weights; normalization and
    softmax stay fp32 (a softmax over fp16 scores would round small probabilities to 0), so
    the file's inputs and outputs are those of the fp32 one."""

    def __init__(self, model: nn.Module, card: ModelCard, *, half: bool = False) -> None:
        super().__init__()
        norm = card.normalization
        self.normalize = Normalize(norm.mean, norm.std, norm.pixel_scale)
        self.model = copy.deepcopy(model).half() if half else model
        self.half = half
        self.softmax = card.output == "probabilities"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        scores = self.model(x.half() if self.half else x).float()
        return scores.softmax(dim=-1) if self.softmax else scores


@dataclass(frozen=True)
class ExportedGraphs:
    """Exported files (by artifact key: ``onnx``, ``onnx-fp16``, ``onnx-int8``...), checked
    against the eager module, with no card embedded yet; ``fp16`` / ``int8``: those files
    against the fp32 ones on the export check's inputs (training replaces them with the
    validation set's figures)."""

    files: dict[str, Path]
    record: ExportRecord
    fp16: PrecisionParity | None = None
    int8: PrecisionParity | None = None


def export_graphs(
    model: nn.Module,
    card: ModelCard,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    fp16: bool = False,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    check_inputs: np.ndarray | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportedGraphs:
    """Export ``model`` (an ``nn.Module`` taking normalized float NCHW) in each of ``formats``,
    with ``fp16`` a half-precision file beside each, and with ``int8`` an int8 file beside
    each fp32 file whose format has one (ONNX).

    ``calibration``: uint8 (N, 3, H, W) crops of real images, preprocessed as the card says
    (a few hundred training images), from which the int8 activation ranges are set.
    ``check_inputs``: uint8 (N, 3, H, W) crops used for the parity check (e.g. preprocessed
    real photos); random pixels are added to them.
    """
    if not card.normalization.in_graph:
        raise ExportError("sota-serve exports put normalization in the graph; set in_graph true")
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    chosen = [f for f in FORMATS if f in formats]  # registry order, whatever was asked
    quantized = [f for f in chosen if "int8" in get_format(f).precisions] if int8 else []
    if int8 and not quantized:
        int8_formats = [f.name for f in FORMAT_REGISTRY.values() if "int8" in f.precisions]
        raise ExportError(f"int8 is written for {', '.join(int8_formats)} only;"
                          f" add one to formats (got {', '.join(chosen)})")
    if int8 and (calibration is None or len(calibration) == 0):
        raise ExportError("int8 export needs calibration images: a few hundred real images,"
                          " preprocessed as the card says (training passes its training images)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precisions = [precision.REFERENCE, "fp16"] if fp16 else [precision.REFERENCE]
    wrappers = {p: ServingModule(model, card, half=p == "fp16").eval().cpu() for p in precisions}
    h, w = card.input.height, card.input.width
    example = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    files: dict[str, Path] = {}
    notes: dict[str, object] = {}
    with torch.inference_mode(False), torch.no_grad():
        for name in chosen:
            for p in precisions:
                key = precision.artifact_key(name, p)
                step(f"export {name} {p}")
                files[key] = out / precision.file_name(name, p)
                notes |= get_format(name).export(wrappers[p], example, files[key])
        for name in quantized:
            key = precision.artifact_key(name, "int8")
            step(f"int8 calibration: {name} on {len(calibration)} images")  # type: ignore[arg-type]
            files[key] = out / precision.file_name(name, "int8")
            notes |= get_format(name).quantize(files[name], batches(calibration), files[key])  # type: ignore[arg-type]
        inputs = _check_batch(check_inputs, (h, w))
        outputs = verify_export(wrappers[precision.REFERENCE], files, inputs, card, tolerance=tolerance)
    diffs = {key: diff for key, (diff, _) in outputs.items()}
    record = ExportRecord(formats=chosen, precisions=precisions + (["int8"] if quantized else []),
                          check_images=int(inputs.shape[0]), max_abs_diff=diffs, tolerance=tolerance,
                          torch=torch.__version__.split("+")[0], onnx=onnx.__version__, **notes)
    probs = {key: p for key, (_, p) in outputs.items()}

    def agreement_of(variant: str) -> PrecisionParity:
        keys = {f: precision.artifact_key(f, variant) for f in chosen}
        return agreement({f: probs[f] for f in keys if keys[f] in probs},
                         {f: probs[k] for f, k in keys.items() if k in probs},
                         source="export check", device="cpu")

    return ExportedGraphs(files=files, record=record, fp16=agreement_of("fp16") if fp16 else None,
                          int8=agreement_of("int8") if quantized else None)


def export_package(model: nn.Module, card: ModelCard, out_dir: str | Path, **options: Any) -> ModelCard:
    """:func:`export_graphs` (``options``: its keywords), then :func:`write_package` with the
    export record added. Returns the card written to card.json."""
    graphs = export_graphs(model, card, out_dir, **options)
    return write_package(out_dir, card.model_copy(update={"export": graphs.record, "fp16": graphs.fp16,
                                                          "int8": graphs.int8}), graphs.files)


def write_package(out_dir: str | Path, card: ModelCard, files: dict[str, Path]) -> ModelCard:
    """Embed the serving part of ``card`` in each file, hash them, write card.json and
    README.md. The files' bytes depend only on the model and the serving part, so recording
    other measurements later leaves their sha256 unchanged."""
    out = Path(out_dir)
    embedded = card.serving_json()
    artifacts: dict[str, ArtifactSpec] = {}
    for key, path in files.items():
        get_format(precision.split_key(key)[0]).embed_card(path, embedded)
        artifacts[key] = ArtifactSpec(path=path.name, sha256=sha256_file(path))
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
) -> dict[str, tuple[float, np.ndarray]]:
    """Run the fp32 eager ``wrapper`` and each exported file (through its runtime, by artifact
    key) on ``inputs``: max |diff| and the file's probabilities, per key. fp16 files are held
    to :data:`FP16_TOLERANCE` (only a broken export fails it), int8 files to finite output."""
    reference = wrapper(torch.from_numpy(inputs)).float()
    if card.output == "logits":
        reference = reference.softmax(-1)
    expected = reference.numpy()
    results: dict[str, tuple[float, np.ndarray]] = {}
    step(f"export parity: {', '.join(files)} against the eager model on {len(inputs)} inputs")
    for key in progress(list(files), desc="export parity check"):
        backend, p = precision.split_key(key)
        runtime = open_runtime(backend, files[key].read_bytes(), card, device="cpu")
        got = runtime.predict(inputs)
        diff = float(np.abs(got - expected).max())
        # int8: no bound, only finite output. On the check's random pixels, far outside the
        # calibrated ranges, it legitimately differs; the card's int8 agreement on real images
        # decides whether auto serves it.
        limit = {precision.REFERENCE: tolerance, "fp16": max(tolerance, FP16_TOLERANCE)}.get(p, float("inf"))
        if not np.isfinite(got).all() or diff > limit:
            hint = (f" In {p} it may overflow; export without --{p}." if p != precision.REFERENCE
                    else " The model may use an operation that does not export faithfully.")
            raise ExportError(
                f"the exported {key} model disagrees with the eager model: max |p diff| ="
                f" {diff:.2e} > {limit:.0e} on {len(inputs)} inputs.{hint}"
            )
        results[key] = (diff, got)
    return results


def _check_batch(check_inputs: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(4, 3, *hw), dtype=np.uint8)
    if check_inputs is None or len(check_inputs) == 0:
        return noise
    if check_inputs.dtype != np.uint8 or check_inputs.shape[1:] != (3, *hw):
        raise ExportError(f"check_inputs must be uint8 (N, 3, {hw[0]}, {hw[1]}), got {check_inputs.shape}")
    return np.concatenate([check_inputs, noise])
