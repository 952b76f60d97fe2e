"""Start from local weights (transfer learning): nothing is downloaded.

Sources: a state dict (``.pth``/``.pt``/``.bin``: torchvision's ResNets, ``learn.save``,
``torch.save(model.state_dict())``), a safetensors file (timm, Hugging Face), or a sota-serve
package (its TorchScript file's weights, and its normalization stats). State dicts are read
with ``weights_only=True``: no pickled code runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sota_serve.errors import SotaServeError
from sota_serve.formats.torchscript import TORCHSCRIPT
from sota_serve.package.card import NormalizationSpec
from sota_serve.package.loading import open_package, sha256_file

#: Below this share of the network's tensors found in the file, it is not a checkpoint of it.
MIN_MATCHED = 0.5
_PREFIXES = ("module.", "model.", "_orig_mod.")


class WeightsError(SotaServeError, ValueError):
    """The weights file cannot be read or does not fit the architecture."""


@dataclass(frozen=True)
class SourceWeights:
    state: dict[str, torch.Tensor]
    file: str
    sha256: str
    kind: str
    #: the stats the weights were trained with, when the source says (sota-serve packages)
    normalization: NormalizationSpec | None = None
    architecture: str | None = None

    def record(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "kind": self.kind,
                **({"architecture": self.architecture} if self.architecture else {})}


def read_weights(path: str | Path) -> SourceWeights:
    path = Path(path)
    if path.is_dir():
        return _from_package(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file or package directory")
    digest = sha256_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return SourceWeights(_strip(load_file(str(path))), path.name, digest, "safetensors")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a state dict torch can read safely ({e})") from e
    for key in ("model", "state_dict"):  # learn.save() / common checkpoint wrappers
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor)")
    return SourceWeights(_strip(data), path.name, digest, "state_dict")


def _from_package(root: Path) -> SourceWeights:
    package = open_package(root)
    if TORCHSCRIPT.name not in package.artifacts:
        raise WeightsError(f"{root}: transfer from a package reads its TorchScript file, which it lacks"
                           " (ONNX weights are not read back); export it with both formats")
    import io

    data = package.read_artifact(TORCHSCRIPT.name)
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    state = {k: v for k, v in module.state_dict().items() if k.startswith("model.")}
    return SourceWeights(_strip(state), package.card.tag, hashlib.sha256(data).hexdigest(), "sota-serve package",
                         normalization=package.card.normalization, architecture=package.card.arch)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_into(model: nn.Module, weights: SourceWeights, arch: str) -> dict[str, int]:
    """Copy every body tensor whose name and shape match; the classifier head (the last Linear
    layer) starts fresh, as in fastai's ``vision_learner``: it is the new task's. Returns
    counts for the card."""
    own = model.state_dict()
    head_name, head_module = _head(model)
    head = {f"{head_name}.{p}" for p, _ in head_module.named_parameters()}
    matched = {k: v for k, v in weights.state.items()
               if k in own and k not in head and own[k].shape == v.shape}
    if len(matched) < MIN_MATCHED * len(own):
        raise WeightsError(
            f"{weights.file}: only {len(matched)} of the {len(own)} tensors of {arch} are in it with"
            f" the right shape; is it a {arch} checkpoint?"
        )
    model.load_state_dict(matched, strict=False)
    return {"loaded": len(matched), "tensors": len(own)}


def head_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Two parameter groups, body and head (the last Linear layer): fastai's ``freeze`` trains
    the head alone, ``slice(lo, hi)`` gives the body the lower rate."""
    _, head = _head(model)
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return [body, list(head.parameters())]


def _head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier head: the last Linear layer, with its name in the state dict."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
