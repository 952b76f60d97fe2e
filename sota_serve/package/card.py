"""The model card, schema_version 1 (see the design notes): the source of truth of a package.

Every required key of the design notes is a typed field here, and so is every section that
sota-serve writes (``metrics``, ``parity``, ``export``, ``training``...). Unknown top-level
keys, and unknown keys inside the record sections, are kept (the schema is extended by adding
keys); the serving sections are strict. Nothing outside this module reads a card by string
keys.

A card has two parts. The *serving part* is what a runtime needs to reproduce predictions
(labels, input, preprocessing, normalization, output, TTA, OOD, descriptions); it is what the
model files embed, so their bytes (and sha256) do not change when measurements do. The
*records* (``RECORD_SECTIONS``) say how the model was made and measured; they live in
``card.json`` only.
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

from sota_serve.constants import DEFAULT_CROP_PCT, INTERPOLATIONS
from sota_serve.errors import CardError
from sota_serve.package.keys import split_key
from sota_serve.tta import LABELS, POLICIES, TTA

SCHEMA_VERSION = 1

_STRICT = ConfigDict(extra="forbid", frozen=True)
_OPEN = ConfigDict(extra="allow", frozen=True)

#: Sections that record how the model was made and measured: card.json only, not embedded.
RECORD_SECTIONS: tuple[str, ...] = ("metrics", "parity", "fp16", "int8", "export", "training", "figures")


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
    """One TTA policy's Gaussian over input statistics (see :mod:`sota_serve.image.ood`)."""

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


class EnsembleMember(BaseModel):
    model_config = _OPEN

    tag: str
    #: sha256 of the member's artifacts, by format
    sha256: dict[str, str]
    weight: float = Field(gt=0)
    #: the member's own validation accuracy (plain), from its card
    accuracy: float | None = None
    normalization: NormalizationSpec


class EnsembleSpec(BaseModel):
    """The members of an ensemble package: its graph runs each on the same uint8 pixels (each
    with its own normalization, inside the graph) and returns ``sum(weight * probabilities)``.
    Extension to the design notes."""

    model_config = _STRICT

    method: Literal["weighted-mean-probabilities"] = "weighted-mean-probabilities"
    members: list[EnsembleMember] = Field(min_length=2)


# --- records (card.json only) -----------------------------------------------------------


class PolicyGain(BaseModel):
    """A TTA policy against ``none`` on the held-out images (McNemar's test)."""

    model_config = _OPEN

    gain: float
    wins: int
    losses: int
    significant: bool


class PolicyMetrics(BaseModel):
    model_config = _OPEN

    accuracy: float | None = None
    accuracy_held_out: float | None = None
    model_calls_per_image: int | None = None
    resize_shortest_edge: int | None = None
    held_out_vs_none: PolicyGain | None = None
    tune_accuracy_by_resize: dict[str, float] | None = None


class TTAMetrics(BaseModel):
    """Every TTA policy measured through the package, and how the default was chosen."""

    model_config = _OPEN

    policies: dict[str, PolicyMetrics] = Field(default_factory=dict)
    default: str | None = None
    tune_images: int | None = None
    held_out_images: int | None = None
    selection: str | None = None


def accuracy_key(policy: str) -> str:
    """The ``metrics`` key of a TTA policy's accuracy: ``accuracy`` for none, ``accuracy_<policy>``."""
    return "accuracy" if policy == "none" else f"accuracy_{policy}"


#: (accuracy key of ``metrics``, the name people read), in order of model calls per image.
ACCURACY_NAMES: tuple[tuple[str, str], ...] = (
    *((accuracy_key(p), LABELS[p]) for p in POLICIES), ("accuracy_fastai_tta", "fastai TTA"),
)


class Metrics(BaseModel):
    """Validation figures, measured through the exported package (and fastai for reference)."""

    model_config = _OPEN

    accuracy: float | None = None
    accuracy_fastai_pipeline: float | None = None
    accuracy_flip: float | None = None
    accuracy_five_crop: float | None = None
    accuracy_ten_crop: float | None = None
    accuracy_fastai_tta: float | None = None
    valid_loss: float | None = None
    valid_count: int | None = None
    train_count: int | None = None
    image_size: int | None = None
    five_crop_resize: int | None = None
    five_crop_by_resize: dict[str, float] | None = None
    tta: TTAMetrics | None = None
    #: ensembles: each member's accuracy (plain) on the same validation images, by tag
    members: dict[str, float] | None = None

    def accuracies(self, *, fastai: bool = True) -> list[tuple[str, str, float]]:
        """(key, name, value) of each recorded accuracy, plain first."""
        rows = [(key, name, getattr(self, key)) for key, name in ACCURACY_NAMES]
        return [(k, n, v) for k, n, v in rows if v is not None and (fastai or k != "accuracy_fastai_tta")]

    def headline(self) -> dict[str, float]:
        """The three figures a listing shows: plain, five-crop and fastai's TTA accuracy."""
        wanted = ("accuracy", "accuracy_five_crop", "accuracy_fastai_tta")
        return {k: v for k, _, v in self.accuracies() if k in wanted}

    def policy(self, policy: str) -> PolicyMetrics | None:
        return self.tta.policies.get(policy) if self.tta else None


class Parity(BaseModel):
    """Validation images run through fastai's pipeline and through the exported package."""

    model_config = _OPEN

    images: int = Field(ge=0)
    backend: str | None = None
    reference: str | None = None
    top1_agreement: float = Field(ge=0, le=1)
    max_abs_diff: float = Field(ge=0)
    passed: bool | None = None


class PrecisionParity(BaseModel):
    """Each fp16 (or int8) artifact against its fp32 sibling on the same images (see
    :mod:`sota_serve.package.precision`): the card's ``fp16`` and ``int8`` records. ``precision auto``
    serves fp16 on a GPU, int8 on a CPU, only where it holds."""

    model_config = _OPEN

    images: int = Field(ge=0)
    #: what ``images`` were: "validation" (training), "export check" (photos and random
    #: pixels), "held-out calibration" or "calibration" (``sota-serve quantize``)
    source: str
    #: where the files ran for this measurement (cuDNN's fp16 kernels differ from the CPU's)
    device: str
    min_top1_agreement: float = Field(ge=0, le=1)
    #: by format name
    top1_agreement: dict[str, float]
    max_abs_diff: dict[str, float]

    def holds(self, backend: str) -> bool:
        return self.images > 0 and self.top1_agreement.get(backend, 0.0) >= self.min_top1_agreement

    def describe(self, backend: str) -> str:
        """One line for people: ``backend``'s agreement, on what, where."""
        return (f"top-1 agreement with fp32 {100 * self.top1_agreement[backend]:.2f}% on {self.images}"
                f" {self.source} images ({self.device}), max |p diff| {self.max_abs_diff[backend]:.2e}")


#: The earlier name of :class:`PrecisionParity`, from when fp16 was the only variant.
Fp16Parity = PrecisionParity


class ExportRecord(BaseModel):
    """The eager module against each exported file, on the same inputs."""

    model_config = _OPEN

    formats: list[str] = Field(min_length=1)
    #: precisions written (fp32 always; fp16 with --fp16 for every format; int8 with --int8 for
    #: the formats that have it, ONNX)
    precisions: list[str] | None = None
    onnx_opset: int | None = None
    #: which torch exporter wrote model.onnx: "dynamo" (torch.export-based) or "torchscript"
    #: (the legacy one, a fallback where the first fails)
    onnx_exporter: str | None = None
    check_images: int | None = None
    max_abs_diff: dict[str, float] = Field(default_factory=dict)
    tolerance: float | None = None
    torch: str | None = None
    onnx: str | None = None
    #: int8: how many preprocessed images set the activation ranges, and the layers kept in fp32
    int8_calibration_images: int | None = None
    int8_fp32_layers: list[str] | None = None


class Epoch(BaseModel):
    model_config = _OPEN

    epoch: int
    stage: int | None = None
    size: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    accuracy: float | None = None
    seconds: float | None = None


class DatasetRecord(BaseModel):
    model_config = _OPEN

    name: str | None = None
    classes: int | None = None
    train: int | None = None
    valid: int | None = None
    fingerprint: str | None = None


class TrainingRecord(BaseModel):
    """How the model was trained. ``recipe`` is the recipe as given to ``sota-serve train``
    (its schema is the training package's, so it stays a plain mapping here)."""

    model_config = _OPEN

    recipe: dict[str, Any] | None = None
    history: list[Epoch] | None = None
    seconds: float | None = None
    device: str | None = None
    versions: dict[str, str] | None = None
    dataset: DatasetRecord | None = None
    #: transfer learning: the starting checkpoint (file, sha256, kind, architecture)
    weights: dict[str, str] | None = None
    #: tensors taken from it ("loaded") of the network's ("tensors")
    transfer: dict[str, int] | None = None
    schedule: str | None = None
    #: per stage: the learning-rate finder's suggestion and the rate used
    lr_find: list[dict[str, float]] | None = None

    @property
    def seed(self) -> int | None:
        return (self.recipe or {}).get("seed")


class ModelCard(BaseModel):
    """Schema version 1: the required keys of the design notes, then optional sections."""

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
    ensemble: EnsembleSpec | None = None
    artifacts: dict[str, ArtifactSpec] = Field(default_factory=dict)
    # Descriptions (embedded with the serving part).
    architecture: str | None = None
    intended_use: str | None = None
    limitations: str | None = None
    license: str | None = None
    # Records (card.json only, see RECORD_SECTIONS).
    metrics: Metrics | None = None
    parity: Parity | None = None
    fp16: PrecisionParity | None = None
    int8: PrecisionParity | None = None
    export: ExportRecord | None = None
    training: TrainingRecord | None = None
    figures: dict[str, str] | None = None

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported by this sota-serve (it reads {SCHEMA_VERSION});"
                " upgrade sota-serve or re-export the package"
            )
        return v

    @field_validator("artifacts")
    @classmethod
    def _known_formats(cls, v: dict[str, ArtifactSpec]) -> dict[str, ArtifactSpec]:
        for key in v:
            split_key(key)  # "onnx", "torchscript", either with "-fp16", "onnx-int8"
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

    @property
    def arch(self) -> str | None:
        """The network's architecture: the card's, else the training recipe's."""
        recipe = self.training.recipe if self.training and self.training.recipe else {}
        return self.architecture or recipe.get("arch")

    def parity_of(self, variant: str) -> PrecisionParity | None:
        """The agreement record of the ``fp16`` or ``int8`` artifacts with fp32, if measured."""
        return {"fp16": self.fp16, "int8": self.int8}.get(variant)

    def to_dict(self, *, with_artifacts: bool = True) -> dict[str, Any]:
        """The JSON object; absent optional sections are left out rather than written null."""
        data = self.model_dump(mode="json", exclude_none=True)
        if not with_artifacts:
            data.pop("artifacts", None)
        return data

    def to_json(self, *, with_artifacts: bool = True) -> str:
        return json.dumps(self.to_dict(with_artifacts=with_artifacts), indent=2, sort_keys=False)

    def serving_json(self) -> str:
        """What a model file embeds: the card without ``artifacts`` (a file cannot hold its own
        hash) and without the records, so the file's bytes do not depend on measurements."""
        data = self.to_dict(with_artifacts=False)
        for key in RECORD_SECTIONS:
            data.pop(key, None)
        return json.dumps(data, indent=2, sort_keys=False)

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


def classifier_card(
    *,
    name: str,
    labels: list[str],
    size: int,
    resize_edge: int,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    tta_edge: int | None = None,
    version: str | None = None,
    **sections: Any,
) -> ModelCard:
    """The card of a square-input classifier whose graph takes uint8 pixels and normalizes and
    applies the softmax itself (what :func:`sota_serve.building.export.export_package` writes).

    Every TTA policy is offered (``none`` the default): flip at ``resize_edge``, five- and
    ten-crop at ``tta_edge`` (default: the crop at timm's 0.875 crop share). ``sections``:
    any other card key (``ood``, ``architecture``, ``metrics``...).
    """
    tta_edge = tta_edge or round(size / DEFAULT_CROP_PCT)
    return ModelCard.parse({
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version or new_version(),
        "task": "image-classification",
        "labels": [str(label) for label in labels],
        "input": {"height": size, "width": size, "channels": "RGB", "layout": "NCHW", "dtype": "uint8"},
        "preprocess": {"exif_transpose": True, "resize_shortest_edge": resize_edge, "crop": "center",
                       "interpolation": "bilinear"},
        "normalization": {"mean": list(mean), "std": list(std), "pixel_scale": 255.0, "in_graph": True},
        "output": "probabilities",
        # flip mirrors the plain center crop; the corner crops need the wider tta_edge
        "tta": {"default": "none", **{p: {"resize_shortest_edge": resize_edge if p == "flip" else tta_edge}
                                      for p in POLICIES[1:]}},
        **sections,
    })


def new_version() -> str:
    """A sortable UTC timestamp, the card's default ``version``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
