"""What every model artifact format provides: the one interface the registry holds.

Serving needs the first group (find the file, read its embedded card, check its bytes);
writing a package needs the second (export a torch module, embed the card). The second group
imports torch inside its methods, so serving an ONNX package never imports it. Which runtime
runs a format's bytes is :mod:`sota_serve.runtime`'s business: a format knows files, not the
card or the runtimes, so the card can depend on the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from sota_serve.errors import ExportError


class ArtifactFormat(ABC):
    #: the key in the card's ``artifacts`` and the ``--backend`` / ``SOTA_SERVE_BACKEND`` value
    name: ClassVar[str]
    #: the file name inside a package directory
    file_name: ClassVar[str]
    #: suffixes by which a lone file is recognised
    suffixes: ClassVar[tuple[str, ...]]
    #: the Open Inference Protocol / Triton platform name of the model
    platform: ClassVar[str]
    #: the precisions it can be written at (see :mod:`sota_serve.package.precision`)
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16")
    #: for a format its framework deprecates: the one line a process logs when it first serves
    #: a file of it, saying what to use instead
    deprecated: ClassVar[str | None] = None

    # --- serving ---------------------------------------------------------------------------

    @abstractmethod
    def read_card(self, path: Path) -> str:
        """The card JSON embedded in the file at ``path``, without running any of its code."""

    def check(self, data: bytes, *, source: str) -> None:  # noqa: B027 - most formats need nothing
        """Refuse bytes that are unsafe to load (the sha256 is checked before this)."""

    # --- writing (imports torch) -----------------------------------------------------------

    @abstractmethod
    def export(self, module: Any, example: Any, path: Path) -> dict[str, Any]:
        """Write the torch ``module`` (uint8 pixels in) traced on ``example`` to ``path``;
        returns what the card's ``export`` record should note about this format."""

    @abstractmethod
    def embed_card(self, path: Path, card_json: str) -> None:
        """Put ``card_json`` into the file, replacing any card it carries."""

    @abstractmethod
    def combine(self, members: list[bytes], weights: list[float], path: Path) -> None:
        """Write to ``path`` one model that runs every member (verified bytes, uint8 pixels in,
        probabilities out) on the same input and returns ``sum(w_i * p_i)``: an ensemble that
        serves, batches and does TTA like any single model."""

    def quantize(self, fp32: Path, calibration: Sequence[Any], path: Path) -> dict[str, Any]:
        """Write to ``path`` an int8 model made from the fp32 file ``fp32``, its activation
        ranges calibrated on ``calibration`` (uint8 NCHW batches the card's preprocessing made);
        returns what the card's ``export`` record should note. Only formats that list ``int8``
        in :attr:`precisions` have it."""
        raise ExportError(f"{self.name} has no int8 export; int8 is written for"
                          " formats whose runtimes have int8 kernels (onnx)")

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.file_name}>"
