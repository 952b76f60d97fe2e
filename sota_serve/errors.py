"""Typed errors. Each message says what went wrong and what to do about it.

``http_status`` is the status a server should answer with when the error comes from a
client's input; the BentoML service maps errors with it, so the mapping lives in one place.
"""

from __future__ import annotations


class SotaServeError(Exception):
    """Base class of every error sota-serve raises on purpose."""

    http_status: int = 500


# --- input images -----------------------------------------------------------------------


class ImageError(SotaServeError, ValueError):
    """The bytes given as an image cannot be used."""

    http_status = 400


class InvalidImageError(ImageError):
    """Not an image, or a damaged (truncated, corrupt) one."""

    http_status = 400


class UnsupportedImageFormatError(ImageError):
    """A real image, but in a format outside the allowlist."""

    http_status = 415


class ImageGeometryError(ImageError):
    """A shape that preprocessing would blow up (an extreme aspect ratio)."""

    http_status = 400


class ImageTooLargeError(ImageError):
    """Too many bytes or too many pixels (including decompression bombs)."""

    http_status = 413


# --- model cards and packages -----------------------------------------------------------


class CardError(SotaServeError, ValueError):
    """A model card is missing or does not follow the schema."""


class PackageError(SotaServeError):
    """A model package cannot be opened."""


class IntegrityError(PackageError):
    """An artifact's bytes do not match the sha256 recorded in the card."""


class ExportError(SotaServeError):
    """Exporting a model failed, or the exported files disagree with the eager model."""


class RuntimeBackendError(SotaServeError):
    """A runtime backend cannot run here (missing package, no CUDA device...)."""


class OnnxRuntimeMissingError(RuntimeBackendError):
    """No ONNX Runtime is installed: the core leaves the build (CPU or CUDA) to the install's
    extras, which put exactly one of the two into an environment."""

    def __init__(self) -> None:
        super().__init__(
            "ONNX Runtime is not installed; install one of its two builds:"
            " pip install 'sota-serve[cpu]' (any machine) or pip install 'sota-serve[gpu]'"
            " (Linux with an NVIDIA GPU; it runs on the CPU too)"
        )


class BadRequestError(SotaServeError, ValueError):
    """A request parameter is out of range (e.g. an unknown ``tta`` or a bad ``top_k``)."""

    http_status = 422


class MalformedRequestError(SotaServeError, ValueError):
    """The request itself is not well formed (a broken multipart body, a non-integer ``top_k``)."""

    http_status = 400


# --- serving ------------------------------------------------------------------------------


class ModelNotFoundError(SotaServeError):
    """A request for a model (or version) this server does not serve."""

    http_status = 404


class ModelLoadError(SotaServeError):
    """A model that could not be loaded, verified or fitted in memory; what serves stays."""

    http_status = 400


class ModelControlError(SotaServeError):
    """Loading or unloading through the API while the server does not allow it."""

    http_status = 403


class OverloadedError(SotaServeError):
    """The server cannot take or finish this request in time; the client should retry later."""

    http_status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceededError(OverloadedError):
    """A request with a strict latency budget (``tta_budget_strict``) that not even the
    cheapest policy can answer within it: refused at once rather than answered late."""
