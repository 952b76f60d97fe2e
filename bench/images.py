"""The benchmark's images: real photos shipped with matplotlib and scikit-learn, plus
resized copies from 300 px to 4000 px (JPEG), so decode cost varies as in real traffic."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import matplotlib
import sklearn
from PIL import Image

PHOTOS = [
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
    Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
]
LONG_EDGES = (300, 640, 1024, 2000, 4000)
#: ImageNet-like uploads: 400-640 px on the long edge, JPEG q90, about 55 KB on average.
IMAGENET_EDGES = (400, 500, 640)
IMAGE_SETS = ("imagenet", "mix")


def image_set(name: str, out: Path) -> list[Path]:
    """``imagenet``: ImageNet-sized JPEGs only; ``mix``: the photos plus 300-4000 px copies."""
    if name == "imagenet":
        return bench_images(out, IMAGENET_EDGES, include_originals=False)
    if name == "mix":
        return bench_images(out, LONG_EDGES)
    raise ValueError(f"unknown image set {name!r}; use one of {', '.join(IMAGE_SETS)}")


def bench_images(out: Path, long_edges: tuple[int, ...] = LONG_EDGES, *,
                 include_originals: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = list(PHOTOS) if include_originals else []
    for photo in PHOTOS:
        with Image.open(photo) as img:
            img = img.convert("RGB")
            for edge in long_edges:
                path = out / f"{photo.stem}_{edge}.jpg"
                if not path.exists():
                    scale = edge / max(img.size)
                    size = (round(img.width * scale), round(img.height * scale))
                    img.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
                files.append(path)
    return files


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header(width: int, height: int) -> bytes:
    """A well-formed PNG start claiming width x height RGB pixels, with a few bytes of data:
    what a huge-dimension attack sends (no real pixels behind the header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
