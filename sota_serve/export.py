"""Write a model package from a torch classifier and its card (imports torch).

The exported graphs take uint8 NCHW pixels and do the card's normalization and the softmax
themselves, so a lone ``model.onnx`` predicts correctly with no knowledge of fastai's
DataLoaders. After writing, the eager module, the ONNX file (ONNX Runtime) and the
TorchScript file run the same inputs; the export is refused if they disagree.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sota_serve.card import ArtifactSpec, ModelCard
from sota_serve.constants import (
    CARD_FILE,
    ONNX_CARD_KEY,
    ONNX_FILE,
    README_FILE,
    TORCHSCRIPT_CARD_FILE,
    TORCHSCRIPT_FILE,
)
from sota_serve.errors import ExportError
from sota_serve.model_readme import render_readme
from sota_serve.progress import progress

ONNX_OPSET = 17
#: Largest |p_eager - p_exported| accepted, per probability.
DEFAULT_TOLERANCE = 1e-4
FORMATS: tuple[str, ...] = ("onnx", "torchscript")


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


def export_package(
    model: nn.Module,
    card: ModelCard,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    check_inputs: np.ndarray | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ModelCard:
    """Export ``model`` (an ``nn.Module`` taking normalized float NCHW) as a package.

    ``check_inputs``: uint8 (N, 3, H, W) crops used for the parity check (e.g. preprocessed
    real photos); random pixels are added to them. Returns the card written to card.json.
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
    with torch.inference_mode(False), torch.no_grad():
        if "onnx" in formats:
            files["onnx"] = _export_onnx(wrapper, example, out / ONNX_FILE)
        if "torchscript" in formats:
            files["torchscript"] = _export_torchscript(wrapper, example, out / TORCHSCRIPT_FILE)
        inputs = _check_batch(check_inputs, (h, w))
        diffs = verify_export(wrapper, files, inputs, card, tolerance=tolerance)
    exported = card.with_updates(
        export={
            "formats": list(files),
            "onnx_opset": ONNX_OPSET if "onnx" in files else None,
            "check_images": int(inputs.shape[0]),
            "max_abs_diff": diffs,
            "tolerance": tolerance,
            "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__,
        }
    )
    return write_card(out, exported, files)


def write_card(out_dir: str | Path, card: ModelCard, files: dict[str, Path] | None = None) -> ModelCard:
    """Embed ``card`` in each artifact, hash them, write card.json and README.md.

    Call again after adding keys (metrics, parity...): the embedded copies and the hashes are
    rewritten; the weights are untouched.
    """
    out = Path(out_dir)
    if files is None:
        files = {b: out / spec.path for b, spec in card.artifacts.items()}
    embedded = card.to_json(with_artifacts=False)  # a file can't hold its own hash
    artifacts: dict[str, ArtifactSpec] = {}
    for backend, path in files.items():
        if backend == "onnx":
            _embed_onnx(path, embedded)
        else:
            _embed_torchscript(path, embedded)
        artifacts[backend] = ArtifactSpec(path=path.name, sha256=_sha256(path))
    final = card.model_copy(update={"artifacts": artifacts})
    final = ModelCard.parse(final.to_dict())  # validate the whole card once more
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
    """Run eager, ONNX Runtime and TorchScript on ``inputs``; max |diff| per format."""
    from sota_serve.runtime.onnx import OnnxRuntime
    from sota_serve.runtime.torchscript import TorchScriptRuntime

    reference = wrapper(torch.from_numpy(inputs)).float()
    if card.output == "logits":
        reference = reference.softmax(-1)
    expected = reference.numpy()
    runtimes = {"onnx": OnnxRuntime, "torchscript": TorchScriptRuntime}
    diffs: dict[str, float] = {}
    for backend in progress(list(files), desc="export parity check"):
        runtime = runtimes[backend](files[backend].read_bytes(), card, device="cpu")
        got = runtime.predict(inputs)
        diffs[backend] = float(np.abs(got - expected).max())
        if not np.isfinite(got).all() or diffs[backend] > tolerance:
            raise ExportError(
                f"the exported {backend} model disagrees with the eager model: max |p diff| ="
                f" {diffs[backend]:.2e} > {tolerance:.0e} on {len(inputs)} inputs. The model may"
                " use an operation that does not export faithfully."
            )
    return diffs


# --- formats -------------------------------------------------------------------------------


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path) -> Path:
    output = "probabilities" if getattr(wrapper, "softmax", True) else "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=[output],
            dynamic_axes={"pixels": {0: "batch"}, output: {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,  # one self-contained file; the dynamo exporter splits out weights
        )
    onnx.checker.check_model(str(path))
    return path


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    torch.jit.save(traced, str(path))
    return path


def _embed_onnx(path: Path, card_json: str) -> None:
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key != ONNX_CARD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=ONNX_CARD_KEY, value=card_json)
    onnx.save(model, str(path))


def _embed_torchscript(path: Path, card_json: str) -> None:
    module = torch.jit.load(str(path), map_location="cpu")
    buffer = io.BytesIO()
    torch.jit.save(module, buffer, _extra_files={TORCHSCRIPT_CARD_FILE: card_json})
    path.write_bytes(buffer.getvalue())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_batch(check_inputs: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(4, 3, *hw), dtype=np.uint8)
    if check_inputs is None or len(check_inputs) == 0:
        return noise
    if check_inputs.dtype != np.uint8 or check_inputs.shape[1:] != (3, *hw):
        raise ExportError(f"check_inputs must be uint8 (N, 3, {hw[0]}, {hw[1]}), got {check_inputs.shape}")
    return np.concatenate([check_inputs, noise])

