"""sota-serve core: model card, packages, preprocessing, runtimes. Imports no torch."""

from sota_serve.errors import (
    CardError,
    ImageError,
    ImageTooLargeError,
    IntegrityError,
    InvalidImageError,
    PackageError,
    SotaServeError,
    UnsupportedImageFormatError,
)
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import ModelPackage, open_package

__version__ = "0.1.0"

__all__ = [
    "CardError",
    "ImageError",
    "ImageTooLargeError",
    "IntegrityError",
    "InvalidImageError",
    "ModelCard",
    "ModelPackage",
    "PackageError",
    "Preprocessor",
    "SotaServeError",
    "UnsupportedImageFormatError",
    "open_package",
]
