"""Property-based fuzzing of the decoder: hostile bytes raise typed errors only, never hang."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sota_serve.errors import ImageError
from sota_serve.image.decode import DecodeLimits, decode_image
from tests.helpers import PHOTOS, encode, gradient_image

LIMITS = DecodeLimits(max_bytes=2_000_000, max_pixels=4_000_000)


def _seeds() -> dict[str, bytes]:
    photo = Image.open(PHOTOS[1]).convert("RGB").resize((96, 64))
    gif = io.BytesIO()
    frames = [gradient_image(40, 30), gradient_image(30, 40).resize((40, 30))]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": encode(photo, "JPEG", quality=80),
        "progressive-jpeg": encode(photo, "JPEG", progressive=True),
        "png": encode(gradient_image(48, 32)),
        "png16": encode(Image.fromarray((__import__("numpy").arange(32 * 32, dtype="uint16") * 60).reshape(32, 32))),
        "webp": encode(photo, "WEBP"),
        "gif": gif.getvalue(),
        "bmp": encode(gradient_image(20, 10), "BMP"),
        "tiff": encode(gradient_image(20, 10), "TIFF"),
    }


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            data = data[:pos]
        elif op == "header":  # rewrite bytes where sizes and counts live
            start = draw(st.integers(0, min(64, len(data))))
            data[start : start + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"BM", b"II*\x00", b"MM\x00*"]


def _check(data: bytes) -> None:
    try:
        img = decode_image(data, limits=LIMITS)
    except ImageError:
        return
    assert img.mode == "RGB" and img.width * img.height <= LIMITS.max_pixels


@settings(max_examples=1500, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated())
def test_mutated_real_images(data):
    _check(data)


@settings(max_examples=800, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(MAGIC), st.binary(max_size=512))
def test_random_bodies_behind_real_magic(magic, body):
    _check(magic + body)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_themselves_decode(name):
    assert decode_image(SEEDS[name], limits=LIMITS).mode == "RGB"


@settings(max_examples=300, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.integers(1, 200_000), st.integers(1, 200_000), st.booleans())
def test_any_dimensions_are_refused_by_their_limit_or_decoded_within_it(width, height, real):
    """Claimed (header-only) or real images of any size: the typed error names the limit that
    applies, and whatever decodes stays within every limit."""
    from bench.images import png_header
    from sota_serve.errors import ImageGeometryError, ImageTooLargeError

    small = width * height <= 40_000
    data = encode(Image.new("L", (width, height), 128)) if real and small else png_header(width, height)
    try:
        img = decode_image(data, limits=LIMITS)
    except ImageTooLargeError:
        assert width * height > LIMITS.max_pixels
        return
    except ImageGeometryError as e:
        assert max(width, height) > LIMITS.max_aspect_ratio * min(width, height) and "aspect ratio" in str(e)
        return
    except ImageError:
        assert not (real and small), "a real, in-limit image was refused"
        return
    assert img.size == (width, height) and max(width, height) <= LIMITS.max_aspect_ratio * min(width, height)
