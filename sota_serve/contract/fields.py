"""The request fields, each declared once, with the reader its values go through.

A value arrives as a JSON value (a protocol parameter, or a form field's text that parses as
JSON, as BentoML's clients send them) or as the text of a form field. Each field's reader
turns it into the field's type or raises the typed error a client can act on: 400
(MalformedRequestError) for a value of the wrong kind, 422 (BadRequestError) for one out of
range, with the messages the checks of the serving core give. The bounds stated with
``Field`` are the ones those checks enforce (the JSON schema publishes them).

Validation context: ``where`` prefixes field names in messages (``"parameter "`` for the Open
Inference Protocol), ``num_classes`` bounds ``classification``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationInfo
from pydantic.fields import FieldInfo

from sota_serve.errors import MalformedRequestError
from sota_serve.explain.occlusion import MAX_GRID, MIN_GRID, check_grid
from sota_serve.predictions import MAX_TOP_K, check_top_k
from sota_serve.serving.fallback import MAX_BUDGET_S, FallbackAsk

_INTEGER = re.compile(r"[+-]?\d{1,9}")


class AsSent:
    """Marks a text field whose form value stays the text that was sent unless it is a JSON
    string (``label=7`` names the label "7" of a digit model)."""


AS_SENT = AsSent()


def where(info: ValidationInfo) -> str:
    return (info.context or {}).get("where", "")


def _string(value: object, info: ValidationInfo) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MalformedRequestError(f"{where(info)}{info.field_name} must be a string, got {value!r:.40}")
    return value


def integer(name: str, value: object) -> int:
    """``value`` as an integer: an int, or the text of one. Raises MalformedRequestError (400)
    naming the field."""
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedRequestError(f"{name} must be an integer, got {value!r:.40}")
    return value


def _top_k(value: object, info: ValidationInfo) -> int:
    return check_top_k(integer(f"{where(info)}top_k", value), MAX_TOP_K)


def _grid(value: object, info: ValidationInfo) -> int:
    return check_grid(integer(f"{where(info)}grid", value))


def _asked(part: str) -> BeforeValidator:
    """A TTA fallback field, read as :meth:`FallbackAsk.parse` reads its ``part``."""
    def read(value: object, info: ValidationInfo) -> Any:
        return getattr(FallbackAsk.parse(**{part: value}, where=where(info)), part)
    return BeforeValidator(read)


def _classification(value: object, info: ValidationInfo) -> int:
    top = (info.context or {}).get("num_classes", MAX_TOP_K)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise MalformedRequestError(f"classification must be an integer in 0..{top}, got {value!r:.40}")
    return value


def is_file(field: FieldInfo) -> bool:
    """Whether the field holds uploaded files (multipart file parts)."""
    return field.annotation in (bytes, list[bytes])


def as_sent(field: FieldInfo) -> bool:
    return AS_SENT in field.metadata


# --- the fields ---------------------------------------------------------------------------

ImageFile = Annotated[bytes, Field(description="One image file.")]
ImageFiles = Annotated[list[bytes], Field(description="Image files (the field repeated).")]

Tta = Annotated[str | None, BeforeValidator(_string), Field(
    description="Test-time augmentation: a policy the card lists (none, flip, five_crop, ten_crop);"
                " omitted: the card's default.")]
TopK = Annotated[Annotated[int, Field(ge=1, le=MAX_TOP_K)], BeforeValidator(_top_k), Field(
    description="How many labels to return, best first (at most the model's labels).")]
TtaFallback = Annotated[bool | None, _asked("enabled"), Field(
    description="Under load, serve a cheaper TTA policy the card lists (ten_crop, five_crop, flip, none)"
                " rather than miss the latency budget; the answer's tta names the policy served,"
                " requested_tta the one asked for. Omitted: the server's SOTA_SERVE_TTA_FALLBACK.")]
TtaBudget = Annotated[Annotated[float, Field(gt=0, le=MAX_BUDGET_S)] | None, _asked("budget_s"), Field(
    description="The latency budget in seconds that tta_fallback keeps to. Omitted: the server's"
                " SOTA_SERVE_TTA_BUDGET_S.")]
TtaBudgetStrict = Annotated[bool | None, _asked("strict"), Field(
    description="With tta_fallback: when not even tta none can be answered within the budget, answer 503"
                " with Retry-After at once (and at dispatch, when the batch could no longer end in time)"
                " instead of late. Omitted: the server's SOTA_SERVE_TTA_BUDGET_STRICT.")]
Label = Annotated[str | None, BeforeValidator(_string), AS_SENT, Field(
    description="The label to explain; omitted: the crop's top-1 label.")]
Grid = Annotated[Annotated[int, Field(ge=MIN_GRID, le=MAX_GRID)], BeforeValidator(_grid), Field(
    description="Cells per side of the occlusion grid.")]
Classification = Annotated[Annotated[int, Field(ge=0)], BeforeValidator(_classification), Field(
    description="Triton's classification extension: answer the top k as BYTES strings"
                      " \"score:index:label\", best first, instead of the probabilities; 0: the probabilities.")]
