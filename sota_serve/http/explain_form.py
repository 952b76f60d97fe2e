"""``POST /explain``'s form: one ``image`` file, an optional ``label`` and an optional ``grid``.

Values are read as the other image routes read theirs (sota_serve/http/routes.py): JSON when
they parse as JSON, as BentoML's clients send them, else text; a label that parses as a
number (``label=7`` for a digit model) stays the text that was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import NamedTuple

from sota_serve.errors import MalformedRequestError
from sota_serve.explain import DEFAULT_GRID
from sota_serve.http.multipart import Part

FILE_FIELD = "image"
_INTEGER = re.compile(r"[+-]?\d{1,9}")


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
        value = _value(texts["label"])
        label = value if isinstance(value, str) else texts["label"]
    grid = _value(texts["grid"]) if "grid" in texts else DEFAULT_GRID
    if isinstance(grid, str) and _INTEGER.fullmatch(grid.strip()):
        grid = int(grid)
    if not isinstance(grid, int) or isinstance(grid, bool):
        raise MalformedRequestError(f"grid must be an integer, got {grid!r:.40}")
    return ExplainForm(images[0], label, grid)


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text
