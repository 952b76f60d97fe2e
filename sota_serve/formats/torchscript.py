"""TorchScript: ``model.pt``, the card as the archive's extra file ``card.json``, run by torch.

TorchScript archives contain code: sota-serve reads the card straight from the zip (no code
runs) and checks the sha256 before the bytes reach ``torch.jit.load``.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path
from typing import Any

from sota_serve.errors import CardError, PackageError
from sota_serve.formats.base import ArtifactFormat

#: Name of the extra file that carries the card inside a TorchScript archive.
CARD_FILE = "card.json"


class TorchScriptFormat(ArtifactFormat):
    name = "torchscript"
    file_name = "model.pt"
    suffixes = (".pt", ".ts")
    platform = "pytorch_libtorch"

    def read_card(self, path: Path) -> str:
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(f"/extra/{CARD_FILE}")]
                if not names:
                    raise CardError(
                        f"{path}: no sota-serve card in the TorchScript archive (extra file"
                        f" {CARD_FILE!r}); export it with sota-serve"
                    )
                return archive.read(names[0]).decode("utf-8")
        except zipfile.BadZipFile as e:
            raise PackageError(f"{path}: not a TorchScript archive ({e})") from e

    def export(self, module: Any, example: Any, path: Path) -> dict[str, Any]:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
        return {}

    def embed_card(self, path: Path, card_json: str) -> None:
        import torch

        module = torch.jit.load(str(path), map_location="cpu")
        buffer = io.BytesIO()
        torch.jit.save(module, buffer, _extra_files={CARD_FILE: card_json})
        path.write_bytes(buffer.getvalue())


    def combine(self, members: list[bytes], weights: list[float], path: Path) -> None:
        import torch

        modules = [torch.jit.load(io.BytesIO(data), map_location="cpu") for data in members]
        ensemble = torch.jit.script(_ensemble_module(modules, weights))
        torch.jit.save(ensemble, str(path))


def _ensemble_module(modules: list[Any], weights: list[float]) -> Any:
    import torch
    from torch import nn

    class Ensemble(nn.Module):
        """``sum(w_i * member_i(pixels))`` over TorchScript members."""

        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(modules)
            self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(0)
            for i, member in enumerate(self.members):
                p = member(pixels) * self.weights[i]
                out = p if i == 0 else out + p
            return out

    return Ensemble().eval()


TORCHSCRIPT = TorchScriptFormat()
