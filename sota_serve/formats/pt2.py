"""torch.export: ``model.pt2``, an ExportedProgram (the graph as JSON, the weights as raw
bytes), the card as the archive's extra file ``card.json``, run by torch.

This is the torch file PyTorch recommends now that TorchScript is deprecated. The serving
module (uint8 pixels in, normalization and softmax inside) is exported with a dynamic batch
dimension, so one file serves every batch size.

Security: ``torch.export.load`` rebuilds the graph from JSON and calls only registered torch
operators, but it unpickles some entries when an archive has them (weights or constants saved
with ``use_pickle``, custom or opaque objects, the legacy layout's weight and sample-input
files). sota-serve writes none of them, and :meth:`Pt2Format.check` refuses an archive that
has any, before the bytes reach ``torch.export.load``. The check reads the archive with
Python's ``zipfile`` and torch with its own reader, so it also refuses what the two could read
differently: two entries of one name (``zipfile`` reads the last, torch's reader may read
another) and entries under more than one root folder (torch looks only below the first entry's).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from sota_serve.errors import CardError, PackageError
from sota_serve.formats.base import ArtifactFormat
from sota_serve.formats.torch_ensemble import weighted_sum

#: Name of the extra file that carries the card inside the archive.
CARD_FILE = "card.json"
#: The archive entries (below the archive's root folder) a sota-serve ``model.pt2`` may hold.
_ALLOWED_PREFIXES = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/", "extra/",
                     ".data/", "archive_format", "archive_version", "byteorder")
_CONFIGS = ("data/weights/", "data/constants/")


class Pt2Format(ArtifactFormat):
    name = "pt2"
    file_name = "model.pt2"
    suffixes = (".pt2",)
    platform = "pytorch_pt2"

    def read_card(self, path: Path) -> str:
        try:
            with zipfile.ZipFile(path) as archive:
                _check_names(archive.namelist(), str(path))
                names = [n for n in archive.namelist() if n.endswith(f"/extra/{CARD_FILE}")]
                if not names:
                    raise CardError(f"{path}: no sota-serve card in the torch.export archive (extra file"
                                    f" {CARD_FILE!r}); export it with sota-serve")
                return archive.read(names[0]).decode("utf-8")
        except zipfile.BadZipFile as e:
            raise PackageError(f"{path}: not a torch.export archive ({e})") from e

    def check(self, data: bytes, *, source: str) -> None:
        """Refuse an archive with an entry that ``torch.export.load`` would unpickle."""
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                _check_names(archive.namelist(), source)
                entries = {_below_root(n): n for n in archive.namelist() if not n.endswith("/")}
                for entry, full in entries.items():
                    if not entry.startswith(_ALLOWED_PREFIXES):
                        _refuse(source, f"has {full!r}, which sota-serve does not write")
                    if entry.startswith("data/sample_inputs/") and archive.getinfo(full).file_size:
                        _refuse(source, f"carries pickled sample inputs ({full!r})")
                    if entry.startswith(_CONFIGS) and entry.endswith(".pt"):
                        _refuse(source, f"uses the legacy pickled layout ({full!r})")
                if "archive_format" not in entries or not any(e.startswith("models/") for e in entries):
                    _refuse(source, "is not in torch.export's pt2 archive layout")
                for entry, full in entries.items():
                    if entry.startswith(_CONFIGS) and entry.endswith("_config.json"):
                        _check_payloads(json.loads(archive.read(full)), source, full)
        except (zipfile.BadZipFile, ValueError, KeyError) as e:
            raise PackageError(f"{source}: not a readable torch.export archive ({e})") from e

    def export(self, module: Any, example: Any, path: Path) -> dict[str, Any]:
        import torch

        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        _save(program, path, {})
        return {}

    def embed_card(self, path: Path, card_json: str) -> None:
        import torch

        program = torch.export.load(str(path))
        _save(program, path, {CARD_FILE: card_json})

    def combine(self, members: list[bytes], weights: list[float], path: Path) -> None:
        import torch

        modules = [torch.export.load(io.BytesIO(data)).module() for data in members]
        # the members' shared input shape, from the first member's input placeholder
        program = torch.export.load(io.BytesIO(members[0]))
        shape = next(n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder"
                     and n.name in program.graph_signature.user_inputs)
        example = torch.zeros((2, *shape[1:]), dtype=torch.uint8)
        ensemble = weighted_sum(modules, weights)
        with torch.no_grad():
            combined = torch.export.export(ensemble, (example,),
                                           dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        _save(combined, path, {})


def _save(program: Any, path: Path, extra_files: dict[str, str]) -> None:
    import torch

    # sample inputs are stored pickled; a sota-serve archive carries none (see check)
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra_files)
    path.write_bytes(buffer.getvalue())


def _below_root(name: str) -> str:
    """An archive entry's path below the archive's root folder (named after the file)."""
    return name.partition("/")[2]


def _check_names(names: list[str], source: str) -> None:
    """Each entry once, all below one root folder: otherwise what ``zipfile`` checks need not be
    what torch's reader loads."""
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        _refuse(source, f"has {len(twice)} name(s) stored more than once ({', '.join(map(repr, twice[:3]))});"
                " a zip reader may read either copy, so the one checked need not be the one loaded",
                fix=_WRITE_AGAIN)
    roots = list(dict.fromkeys(n.partition("/")[0] for n in names))  # in the archive's order
    if len(roots) > 1 or any("/" not in n for n in names):
        _refuse(source, f"has entries outside one root folder (roots: {', '.join(map(repr, roots[:4]))});"
                " torch reads only below the first entry's folder, so the others would be checked but not loaded",
                fix=_WRITE_AGAIN)


def _check_payloads(config: dict[str, Any], source: str, entry: str) -> None:
    for fqn, payload in config.get("config", {}).items():
        if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(("weight_", "tensor_")):
            _refuse(source, f"stores {fqn!r} pickled or as a custom object ({entry})")


_PLAIN_TENSORS = "sota-serve loads only archives whose weights are plain tensors (re-export it with sota-serve)"
_WRITE_AGAIN = ("write the archive again with torch.export.save or `sota-serve export`, which store each entry"
                " once under one root folder, rather than editing it with a zip tool")


def _refuse(source: str, why: str, *, fix: str = _PLAIN_TENSORS) -> None:
    raise PackageError(f"{source}: the torch.export archive {why}; {fix}")


PT2 = Pt2Format()
