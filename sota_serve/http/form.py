"""An image route's multipart form read as its request model (sota_serve/contract/requests.py).

Each field of the model is looked up among the parts by name: a file field takes the file
parts (one, or all of them for a list), a value field the last part of its name, read as
BentoML reads values (JSON when it parses as JSON, as its clients send them, else the text;
a field marked as sent keeps the text unless it is a JSON string). Parts the model does not
name are ignored, as BentoML ignores them. The field's own reader then checks the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sota_serve.contract.fields import as_sent, is_file
from sota_serve.contract.requests import Form, validated
from sota_serve.errors import MalformedRequestError
from sota_serve.http.multipart import Part, field_value

F = TypeVar("F", bound=Form)


def read_form(form: type[F], parts: Sequence[Part], path: str) -> F:
    """The request of ``form`` in ``parts``, the form of a POST to ``path``. Raises
    MalformedRequestError (400) for a single-file field given another number of files, and
    what the fields' readers raise (400 for a value of the wrong kind, 422 out of range)."""
    values: dict[str, Any] = {}
    for name, field in form.model_fields.items():
        found = [p for p in parts if p.name == name]
        if is_file(field):
            files = [p.content for p in found]
            if field.annotation is bytes and len(files) != 1:
                raise MalformedRequestError(f"{path} takes one {name!r} file, got {len(files)}{form.many_files_hint}")
            values[name] = files[0] if field.annotation is bytes else files
        elif found:
            text = found[-1].text()
            value = field_value(text)
            values[name] = text if as_sent(field) and not isinstance(value, str) else value
    return validated(form, values)
