"""Shared test helpers: real photos, tiny real models, odd images."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from bench.images import PHOTOS
from bench.models import tiny_cnn

LABELS = ["cat", "dog", "bird"]

__all__ = ["PHOTOS", "LABELS", "card_dict", "encode", "gradient_image", "python_sources", "tiny_cnn"]

ROOT = Path(__file__).resolve().parents[1]


def python_sources(*rooms: str) -> list[Path]:
    """The project's Python files under ``rooms`` (``"bench"``, ...): not those in a folder
    whose name starts with a dot, where caches and venvs live (bench/.cache holds MLServer's
    venv, whose site-packages are a third party's code)."""
    return [p for room in rooms for p in sorted((ROOT / room).rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def card_dict(**overrides) -> dict:
    card = {
        "schema_version": 1,
        "name": "tiny-cnn",
        "version": "1",
        "task": "image-classification",
        "labels": list(LABELS),
        "input": {"height": 32, "width": 32, "channels": "RGB", "layout": "NCHW", "dtype": "uint8"},
        "preprocess": {"exif_transpose": True, "resize_shortest_edge": 36, "crop": "center",
                       "interpolation": "bilinear"},
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "pixel_scale": 255.0, "in_graph": True},
        "output": "probabilities",
        "tta": {"default": "none", "flip": {"resize_shortest_edge": 36},
                "five_crop": {"resize_shortest_edge": 40}, "ten_crop": {"resize_shortest_edge": 40}},
    }
    card.update(overrides)
    return card


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient_image(w: int = 97, h: int = 71, mode: str = "RGB") -> Image.Image:
    """Deterministic, asymmetric content (so rotations and crops are distinguishable)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x * y) % 256)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def tampered_copy(package: Path, into: Path, file: str) -> Path:
    """A copy of ``package`` in ``into`` with one byte of ``file`` flipped (its sha256 no
    longer matches the card's)."""
    copy = into / "pkg"
    shutil.copytree(package, copy)
    data = bytearray((copy / file).read_bytes())
    data[-10] ^= 0xFF
    (copy / file).write_bytes(bytes(data))
    return copy


def served_like_offline(package: Path, photo: Path, home: Path, *, precision: str, env: dict[str, str]) -> None:
    """A real ``bentoml serve`` of ``package`` with ``env`` answers ``photo`` as the offline
    classifier at ``precision`` does, and its log names that precision."""
    import httpx

    from bench.server import Server
    from sota_serve.classifier import Classifier

    expected = Classifier.open(package, device="cpu", precision=precision).classify([photo.read_bytes()])
    with Server(package, home=home, env={"SOTA_SERVE_DEVICE": "cpu", **env}) as server:
        r = httpx.post(f"{server.url}/classify", files={"image": ("a.jpg", io.BytesIO(photo.read_bytes()))},
                       timeout=30)
        log = server.output()
    assert r.status_code == 200, r.text
    got = r.json()["predictions"][0]
    want = expected[0].predictions[0]
    assert got["label"] == want.label and abs(got["score"] - want.score) < 1e-5
    assert f"{precision}, decode pillow" in log
