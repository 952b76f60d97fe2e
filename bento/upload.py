"""An uploaded file kept in memory.

BentoML's ``Path`` parameters write every upload to a temporary file that the handler then
reads back (measured with py-spy: about 0.65 ms of the event loop per request, a tenth of
the service's time per request on the demo model). ``Upload`` is still a path type to
BentoML, so it is parsed from multipart/form-data and documented as a binary file in the
OpenAPI schema and BentoML's clients, but it holds the bytes instead of a file name.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema
from starlette.datastructures import UploadFile


class Upload(PurePosixPath):
    """``Upload("name.jpg", data=b"...")``; ``.data`` holds the bytes."""

    data: bytes

    def __new__(cls, name: str = "upload", *, data: bytes = b"") -> Upload:
        self = super().__new__(cls, name or "upload")
        self.data = data
        return self

    @classmethod
    def _validate(cls, obj: Any) -> Upload:
        if isinstance(obj, Upload):
            return obj
        if isinstance(obj, UploadFile):  # the body is spooled in memory below 1 MiB
            return cls(obj.filename or "upload", data=obj.file.read())
        if isinstance(obj, bytes):
            return cls(data=obj)
        if isinstance(obj, Path):  # a local call with a file name
            return cls(obj.name, data=obj.read_bytes())
        raise PydanticCustomError("file_type", "expected a file upload")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda u: u.data))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {"type": "file", "format": "binary"}
