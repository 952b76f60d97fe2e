"""The model card, schema_version 1 (see the design notes): the source of truth of a package.

Every required key of the design notes is a typed field here. Unknown *top-level* keys are
kept (the schema may be extended by adding keys); the required sections are strict.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sota_serve.constants import INTERPOLATIONS
from sota_serve.errors import CardError
from sota_serve.tta import POLICIES, TTA

SCHEMA_VERSION = 1

_STRICT = ConfigDict(extra="forbid", frozen=True)
_OPEN = ConfigDict(extra="allow", frozen=True)


class InputSpec(BaseModel):
    model_config = _STRICT

    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)
    channels: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["uint8", "float32"] = "uint8"


class PreprocessSpec(BaseModel):
    model_config = _STRICT

    exif_transpose: bool = True
    resize_shortest_edge: int = Field(gt=0, le=16384)
    crop: Literal["center"] = "center"
    interpolation: str = "bilinear"

    @field_validator("interpolation")
    @classmethod
    def _known_filter(cls, v: str) -> str:
        if v not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {v!r}; use one of {', '.join(INTERPOLATIONS)}")
        return v


class NormalizationSpec(BaseModel):
    model_config = _STRICT

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float = Field(default=255.0, gt=0)
    in_graph: bool = True

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"every std must be > 0, got {list(v)}")
        return v


class CropSpec(BaseModel):
    """The resize edge of one TTA policy (its crops are fixed by :mod:`sota_serve.tta`)."""

    model_config = _STRICT

    resize_shortest_edge: int = Field(gt=0, le=16384)


class TTASpec(BaseModel):
    """Which TTA policies the package offers (``none`` always) and the default one."""

    model_config = _STRICT

    default: TTA = "none"
    flip: CropSpec | None = None
    five_crop: CropSpec | None = None
    ten_crop: CropSpec | None = None

    def edges(self) -> dict[str, int]:
        """The resize edge of each policy this card lists beyond ``none``, in POLICIES order."""
        specs = ((p, getattr(self, p)) for p in POLICIES[1:])
        return {p: spec.resize_shortest_edge for p, spec in specs if spec is not None}

    def policies(self) -> tuple[str, ...]:
        """The policies this card lists, ``none`` first, in order of model calls per image."""
        return ("none", *self.edges())


class OODFit(BaseModel):
    """One TTA policy's Gaussian over input statistics (see :mod:`sota_serve.ood`)."""

    model_config = _STRICT

    mean: list[float] = Field(min_length=1)
    precision: list[list[float]] = Field(min_length=1)
    threshold: float = Field(gt=0)
    valid_flag_rate: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _square(self) -> OODFit:
        n = len(self.mean)
        if len(self.precision) != n or any(len(row) != n for row in self.precision):
            raise ValueError(f"precision must be {n}x{n}, like mean")
        return self


class OODSpec(BaseModel):
    """The out-of-distribution signal: one fit per TTA policy, since the statistics are those
    of the crops the model sees. Extension to the design notes."""

    model_config = _STRICT

    method: Literal["input-stats-mahalanobis-v1"]
    features: str = ""
    percentile: float = Field(gt=0, le=100)
    fit_images: int = Field(ge=2)
    calibration_images: int = Field(ge=1)
    policies: dict[TTA, OODFit] = Field(min_length=1)


class ArtifactSpec(BaseModel):
    model_config = _STRICT

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _inside_package(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or not v:
            raise ValueError(f"artifact path must be relative and inside the package, got {v!r}")
        return v


class ModelCard(BaseModel):
    """Schema version 1. ``metrics``, ``training``, ``parity`` and other keys are free-form;
    ``ood`` is typed when present."""

    model_config = _OPEN

    schema_version: int
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    task: Literal["image-classification"] = "image-classification"
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    preprocess: PreprocessSpec
    normalization: NormalizationSpec
    output: Literal["probabilities", "logits"] = "probabilities"
    tta: TTASpec = TTASpec()
    ood: OODSpec | None = None
    artifacts: dict[Literal["onnx", "torchscript"], ArtifactSpec] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported by this sota-serve (it reads {SCHEMA_VERSION});"
                " upgrade sota-serve or re-export the package"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v: list[str]) -> list[str]:
        if any(not label for label in v):
            raise ValueError("labels must be non-empty strings")
        if len(set(v)) != len(v):
            raise ValueError("labels must be distinct")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        crop_edge = max(self.input.height, self.input.width)
        if self.preprocess.resize_shortest_edge < min(self.input.height, self.input.width):
            raise ValueError(
                f"preprocess.resize_shortest_edge ({self.preprocess.resize_shortest_edge}) is smaller"
                f" than the crop input.height x input.width ({self.input.height}x{self.input.width})"
            )
        for policy, edge in self.tta.edges().items():
            if edge < crop_edge:
                raise ValueError(
                    f"tta.{policy}.resize_shortest_edge ({edge}) is smaller than the crop"
                    f" ({self.input.height}x{self.input.width})"
                )
        if self.tta.default not in self.tta.policies():
            raise ValueError(f"tta.default is {self.tta.default!r} but tta.{self.tta.default} is not set")
        expected = "uint8" if self.normalization.in_graph else "float32"
        if self.input.dtype != expected:
            raise ValueError(
                f"input.dtype must be {expected!r} when normalization.in_graph is"
                f" {self.normalization.in_graph}"
            )
        return self

    # --- conveniences ----------------------------------------------------------------------

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self, *, with_artifacts: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if not with_artifacts:
            data.pop("artifacts", None)
        return data

    def to_json(self, *, with_artifacts: bool = True) -> str:
        return json.dumps(self.to_dict(with_artifacts=with_artifacts), indent=2, sort_keys=False)

    def with_updates(self, **changes: Any) -> ModelCard:
        """A validated copy with top-level keys replaced or added."""
        return ModelCard.parse(self.to_dict() | changes)

    @classmethod
    def parse(cls, data: dict[str, Any] | str | bytes, *, source: str = "card") -> ModelCard:
        """Validate a card; every problem is reported with the field it concerns."""
        try:
            if isinstance(data, str | bytes):
                data = json.loads(data)
            if not isinstance(data, dict):
                raise CardError(f"{source}: a model card is a JSON object, got {type(data).__name__}")
            return cls.model_validate(data)
        except json.JSONDecodeError as e:
            raise CardError(f"{source}: not valid JSON ({e})") from e
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(card)'}: {err['msg']}"
                for err in e.errors()
            )
            raise CardError(f"{source}: invalid model card: {problems}") from e

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CardError(f"cannot read model card {path}: {e.strerror}") from e
        return cls.parse(text, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def new_version() -> str:
    """A sortable UTC timestamp, the card's default ``version``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
