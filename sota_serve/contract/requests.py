"""Each route's and each protocol method's request, as a model of the fields it takes
(sota_serve/contract/fields.py). A model's docstring is the route's description, its first
sentence the summary; a field added here is read, declared and documented everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from sota_serve.contract.fields import (
    Classification,
    Grid,
    ImageFile,
    ImageFiles,
    Label,
    TopK,
    Tta,
    TtaBudget,
    TtaBudgetStrict,
    TtaFallback,
    is_file,
)
from sota_serve.errors import MalformedRequestError, SotaServeError
from sota_serve.explain.occlusion import DEFAULT_GRID
from sota_serve.predictions import DEFAULT_TOP_K
from sota_serve.serving.fallback import FallbackAsk


class Form(BaseModel):
    """An image route's multipart form."""

    #: what a form with several files for its one file field is told, after how many it sent
    many_files_hint: ClassVar[str] = ""


class TtaOptions(BaseModel):
    """How an image is augmented and what the fallback ladder may do under load: the image
    routes' options and the Open Inference Protocol's request parameters alike."""

    tta: Tta = None
    tta_fallback: TtaFallback = None
    tta_budget_s: TtaBudget = None
    tta_budget_strict: TtaBudgetStrict = None

    def fallback(self) -> FallbackAsk:
        return FallbackAsk(self.tta_fallback, self.tta_budget_s, self.tta_budget_strict)


class ClassifyOptions(TtaOptions):
    top_k: TopK = DEFAULT_TOP_K


class ClassifyForm(ClassifyOptions, Form):
    """Classify one image: the labels with the highest probabilities."""

    many_files_hint: ClassVar[str] = "; send several to /classify_batch as 'images'"
    image: ImageFile


class ClassifyBatchForm(ClassifyOptions, Form):
    """Classify several images in one request; the results keep the order of the files, and a
    bad image gets its own error entry without failing the others."""

    images: ImageFiles


class ExplainForm(Form):
    """Explain a prediction: which parts of the image the score depends on. Occlusion
    sensitivity over the plain (center) crop: each cell of a grid x grid grid is covered in
    turn with the normalization mean, and grid[i][j] is the label's probability on the whole
    crop minus its probability with cell (row i, column j) covered. The grid*grid + 1 crops
    cost as many model calls as that many plain /classify requests. `window` is the crop's box
    on the uploaded image, in its pixels, to draw the map over it."""

    image: ImageFile
    label: Label = None
    grid: Grid = DEFAULT_GRID


class InferParameters(TtaOptions):
    """An Open Inference Protocol request's parameters (REST and gRPC); others are ignored.
    ``tta`` applies to the ``image`` input: ``pixels`` are already single crops."""


class OutputParameters(BaseModel):
    """The parameters of the requested output ``probabilities``."""

    classification: Classification = 0


#: the multipart form of each image route
FORMS: dict[str, type[Form]] = {
    "/classify": ClassifyForm, "/classify_batch": ClassifyBatchForm, "/explain": ExplainForm}


def file_field(form: type[BaseModel]) -> str:
    """The name of the form's file field."""
    (name,) = (name for name, field in form.model_fields.items() if is_file(field))
    return name


#: image route -> its file field
FILE_FIELDS = {path: file_field(form) for path, form in FORMS.items()}

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: Mapping[str, Any], **context: Any) -> M:
    """``values`` read as ``model``'s fields (``context``: see sota_serve/contract/fields.py).
    Raises the typed error of the first field whose reader refused its value."""
    try:
        return model.model_validate(values, context=context)
    except ValidationError as e:
        for error in e.errors():
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, SotaServeError):
                raise cause from None
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedRequestError(f"{context.get('where', '')}{where}: {first['msg']}") from None
