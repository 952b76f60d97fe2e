"""Odd and bad images: the right pixels or the right typed error."""

import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from bench.images import png_header
from sota_serve.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError
from sota_serve.image.decode import DecodeLimits, decode_image, read_header
from tests.helpers import encode, gradient_image


def test_real_photo_decodes_to_rgb(photos):
    img = decode_image(photos[0].read_bytes())
    assert img.mode == "RGB" and img.size == Image.open(photos[0]).size


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "I;16", "CMYK", "P"])
def test_modes_become_rgb(mode):
    src = gradient_image(mode="L" if mode in ("I;16",) else "RGB")
    if mode == "I;16":
        arr = (np.asarray(src, dtype=np.uint16) * 257).astype(np.uint16)
        img, fmt = Image.fromarray(arr), "PNG"
    else:
        img, fmt = src.convert(mode), ("JPEG" if mode == "CMYK" else "PNG")
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == src.size


def test_16bit_png_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(arr))))
    expected = np.rint(arr / 257.0).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert out.max() == 255 and out.min() == 0 and len(np.unique(out)) > 200


def test_palette_with_transparency_keeps_colours():
    img = gradient_image().convert("P")
    img.info["transparency"] = 0
    out = decode_image(encode(img, transparency=0))
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGBA").convert("RGB")))


def test_rgba_drops_alpha_like_convert():
    rgba = gradient_image().convert("RGBA")
    rgba.putalpha(128)
    assert np.array_equal(np.asarray(decode_image(encode(rgba))), np.asarray(rgba.convert("RGB")))


def test_cmyk_jpeg_matches_pillow_conversion():
    cmyk = gradient_image().convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_equals_upright(orientation):
    upright = gradient_image(96, 64)
    transpose = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(transpose[orientation])  # how a camera would store it
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)  # lossless, so pixels compare exactly
    out = decode_image(data)
    assert out.size == upright.size
    assert np.array_equal(np.asarray(out), np.asarray(upright))


def test_exif_transpose_can_be_turned_off():
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(gradient_image(96, 64), exif=exif), exif_transpose=False)
    assert out.size == (96, 64)


def test_truncated_jpeg_is_refused(photos):
    data = photos[0].read_bytes()
    with pytest.raises(InvalidImageError, match="damaged"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"hello, this is text", b"\x00" * 100, b"GIF89a"])
def test_not_images(data):
    with pytest.raises(InvalidImageError):
        decode_image(data)


def test_huge_dimensions_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(png_header(60000, 60000))


def test_pixel_limit_is_configurable():
    data = encode(gradient_image(100, 100))
    with pytest.raises(ImageTooLargeError, match="10,000 pixels|above the limit of 9,999"):
        decode_image(data, limits=DecodeLimits(max_pixels=9_999))
    assert decode_image(data, limits=DecodeLimits(max_pixels=10_000)).size == (100, 100)


def test_byte_limit():
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(b"x" * 2048, limits=DecodeLimits(max_bytes=1024))


def test_unsupported_real_format_is_415():
    data = encode(gradient_image(32, 32), "ICO")
    with pytest.raises(UnsupportedImageFormatError) as e:
        decode_image(data)
    assert e.value.http_status == 415


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50


def test_jpeg_draft_is_close_to_full_decode(photos):
    data = photos[1].read_bytes()  # china.jpg, 640x427
    full = decode_image(data)
    draft = decode_image(data, draft_edge=100)
    assert min(draft.size) >= 100 and draft.size[0] < full.size[0]


# --- decompression bombs, on several threads at once ------------------------------------------

#: 10,000 x 10,000 = 100 MP: above Pillow's MAX_IMAGE_PIXELS (89.5 MP) and below twice it, the
#: range where Pillow warns (DecompressionBombWarning) instead of raising
WARNED_SIDE = 10_000
NO_PIXEL_LIMIT = DecodeLimits(max_pixels=10**12)


def test_a_bomb_is_refused_where_pillow_would_only_warn_and_no_warning_escapes():
    assert Image.MAX_IMAGE_PIXELS < WARNED_SIDE**2 <= 2 * Image.MAX_IMAGE_PIXELS
    bomb = png_header(WARNED_SIDE, WARNED_SIDE)
    with warnings.catch_warnings(record=True) as seen:  # this test's own thread only
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError, match="decompression bomb refused.*MAX_IMAGE_PIXELS") as e:
            decode_image(bomb, limits=NO_PIXEL_LIMIT)
        with pytest.raises(ImageTooLargeError, match="decompression bomb refused"):
            read_header(bomb, limits=NO_PIXEL_LIMIT)
    assert e.value.http_status == 413
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    with warnings.catch_warnings():  # a process that runs with -W error gets the same typed error
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError, match="decompression bomb refused"):
            decode_image(bomb, limits=NO_PIXEL_LIMIT)


def test_pillows_documented_limit_is_honoured(monkeypatch):
    data = encode(gradient_image(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9_999)
    with pytest.raises(ImageTooLargeError, match="10,000 pixels, above Pillow's limit of 9,999"):
        decode_image(data, limits=NO_PIXEL_LIMIT)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's switch for "no bomb check"
    assert decode_image(data, limits=NO_PIXEL_LIMIT).size == (100, 100)


def test_concurrent_decodes_give_each_image_its_answer_and_leave_the_warning_filters_alone(photos):
    """Decode threads never swap the process's warning filters (``warnings.catch_warnings`` is
    not thread-safe before Python 3.14): a watcher sees the same filters throughout, while
    four threads decode bombs, photos and a format outside the allowlist in turn."""
    photo, small = photos[0].read_bytes(), encode(gradient_image(97, 71))
    ico = encode(gradient_image(32, 32), "ICO")
    want = {"photo": np.asarray(decode_image(photo)), "small": np.asarray(decode_image(small))}
    inputs = [("photo", photo, NO_PIXEL_LIMIT), ("warned-bomb", png_header(WARNED_SIDE, WARNED_SIDE), NO_PIXEL_LIMIT),
              ("small", small, DecodeLimits()), ("giant", png_header(60000, 60000), DecodeLimits()),
              ("ico", ico, DecodeLimits())]
    original, before = warnings.filters, list(warnings.filters)
    changed: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if warnings.filters is not original or warnings.filters != before:
                changed.append(repr(warnings.filters[:2]))
                return

    def decode(i: int) -> tuple[str, object]:
        name, data, limits = inputs[i % len(inputs)]
        try:
            return name, np.asarray(decode_image(data, limits=limits))
        except Exception as e:
            return name, e

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(decode, range(100)))
    finally:
        stop.set()
        watcher.join()
    assert not changed, f"decoding changed warnings.filters: {changed[0]}"
    assert warnings.filters is original and warnings.filters == before
    for name, got in results:
        if name in want:
            assert isinstance(got, np.ndarray) and np.array_equal(got, want[name]), name
        elif name == "ico":
            assert isinstance(got, UnsupportedImageFormatError), (name, got)
        else:
            assert isinstance(got, ImageTooLargeError), (name, got)
            assert ("decompression bomb" in str(got)) == (name == "warned-bomb"), (name, got)
