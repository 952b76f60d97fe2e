"""``POST /explain``'s form: one ``image`` file, an optional ``label`` and an optional ``grid``.

Values are read as the other image routes read theirs (sota_serve/http/routes.py): JSON when
they parse as JSON, as BentoML's clients send them, else text; a label that parses as a
number (``label=7`` for a digit model) stays the text that was sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sota_serve.errors import MalformedRequestError
from sota_serve.explain.occlusion import DEFAULT_GRID
from sota_serve.http.multipart import Part, field_value, integer_field

FILE_FIELD = "image"


class ExplainForm(NamedTuple):
    image: bytes
    #: None: the top-1 label of the unoccluded crop
    label: str | None
    grid: int


def explain_form(parts: Sequence[Part]) -> ExplainForm:
    """The form's fields; raises MalformedRequestError (400) for a form without exactly one
    image or with a grid that is not an integer (its range is the pipeline's to check: 422)."""
    images = [p.content for p in parts if p.name == FILE_FIELD]
    if len(images) != 1:
        raise MalformedRequestError(f"/explain takes one 'image' file, got {len(images)}")
    texts = {p.name: p.text() for p in parts if p.name in ("label", "grid")}
    label = None
    if "label" in texts:
        value = field_value(texts["label"])
        label = value if isinstance(value, str) else texts["label"]
    grid = integer_field("grid", field_value(texts["grid"])) if "grid" in texts else DEFAULT_GRID
    return ExplainForm(images[0], label, grid)
