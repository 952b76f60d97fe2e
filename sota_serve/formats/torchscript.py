"""TorchScript: ``model.pt``, the card as the archive's extra file ``card.json``, run by torch.

TorchScript archives contain code: sota-serve reads the card straight from the zip (no code
runs) and checks the sha256 before the bytes reach ``torch.jit.load``.

PyTorch deprecates TorchScript in favour of torch.export (:mod:`sota_serve.formats.pt2`, which
packages carry beside ``model.pt``). sota-serve still reads and writes ``model.pt`` for those who
serve it; every ``torch.jit`` call goes through :func:`quiet_jit`, which hides only torch.jit's
own deprecation notice, and the runtime says once, in the log, what to use instead.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sota_serve.errors import CardError, PackageError
from sota_serve.formats.base import ArtifactFormat
from sota_serve.formats.torch_ensemble import weighted_sum

#: Name of the extra file that carries the card inside a TorchScript archive.
CARD_FILE = "card.json"
#: torch.jit's deprecation notice (``torch.jit.load`` / ``save`` / ``trace`` / ``script``), a FutureWarning.
JIT_DEPRECATION = r"`torch\.jit\.\w+` is (deprecated|not supported)"


@contextmanager
def quiet_jit() -> Iterator[None]:
    """Hide torch.jit's deprecation FutureWarning (the log says it once, see the runtime);
    every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=FutureWarning)
        yield


class TorchScriptFormat(ArtifactFormat):
    name = "torchscript"
    file_name = "model.pt"
    suffixes = (".pt", ".ts")
    platform = "pytorch_libtorch"
    deprecated = ("TorchScript is deprecated by PyTorch: serve this package's model.pt2 with backend pt2"
                  " instead (SOTA_SERVE_BACKEND=pt2, predict --backend pt2; `sota-serve export` writes it)")

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

        with quiet_jit(), warnings.catch_warnings():
            # the tracer's notes on the module's Python control flow, which the check that
            # follows the export covers (eager against exported outputs)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, str(path))
        return {}

    def embed_card(self, path: Path, card_json: str) -> None:
        import torch

        buffer = io.BytesIO()
        with quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu")
            torch.jit.save(module, buffer, _extra_files={CARD_FILE: card_json})
        path.write_bytes(buffer.getvalue())

    def combine(self, members: list[bytes], weights: list[float], path: Path) -> None:
        import torch

        with quiet_jit():
            modules = [torch.jit.load(io.BytesIO(data), map_location="cpu") for data in members]
            ensemble = torch.jit.script(weighted_sum(modules, weights).eval())
            torch.jit.save(ensemble, str(path))


TORCHSCRIPT = TorchScriptFormat()
