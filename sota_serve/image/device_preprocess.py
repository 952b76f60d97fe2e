"""Decode and crop on the model's device: nvJPEG through torchvision, resize in torch.

With the model on a GPU, Pillow becomes the server's bottleneck: on a 16-core H100 machine
it decodes and crops about 1,200 ImageNet-sized JPEGs/s with every core, while nvJPEG plus a
torch resize do about 2,800/s from one thread (``python -m dev.probes.decode_probe --device
cuda`` measures both), which leaves the cores to HTTP. The crops stay on the device and
reach the runtime without a host copy.

The semantics are :class:`sota_serve.image.preprocess.Preprocessor`'s: the same header checks and
limits, EXIF orientation, shortest-edge resize with Pillow's antialiasing, the TTA crops. Pixels differ slightly, since nvJPEG's IDCT and chroma upsampling are not
libjpeg's (BENCHMARKS.md has the measured difference). The crop windows of every TTA
policy are :mod:`sota_serve.tta`'s, as on the CPU. Whatever this path cannot take exactly
goes through Pillow and is uploaded: formats other than baseline JPEG, CMYK JPEGs, files that
do not end where a JPEG ends (truncated ones, so that they fail as they do on the CPU path),
and cards whose interpolation torch does not compute as Pillow does.

torch and torchvision are imported only when this class is built: a CPU server never loads them.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sota_serve.errors import ImageError
from sota_serve.image.decode import ImageHeader, read_header
from sota_serve.image.preprocess import Preprocessor, resized_size
from sota_serve.tta import windows

if TYPE_CHECKING:
    import torch

#: Card interpolations that torch's antialiased resize computes as Pillow does.
INTERPOLATIONS = ("bilinear", "bicubic")
_JPEG_END = b"\xff\xd9"


def unavailable_reason(device: str) -> str | None:
    """Why decoding on ``device`` cannot work here, or None when it can (tries one JPEG)."""
    try:
        import torch
        from torchvision.io import decode_jpeg
    except ImportError as e:
        return f"torchvision is not installed ({e.name}); pip install torchvision"
    if device == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_jpeg(torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8), device=device)
    except Exception as e:  # no nvJPEG in this build, driver mismatch, ...
        return f"torchvision cannot decode JPEGs on {device}: {str(e).strip()[:200]}"
    return None


def _upright(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF ``orientation`` to a (C, H, W) tensor, as ``PIL.ImageOps.exif_transpose``."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return img.rot90(-1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.rot90(1, (-2, -1))
    return img


class DevicePreprocessor:
    """``(bytes, tta) -> (k, 3, H, W)`` uint8 tensor on ``device``, like ``Preprocessor``."""

    def __init__(self, pre: Preprocessor, device: str) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812
        from torchvision.io import ImageReadMode, decode_jpeg

        # torchvision >= 0.29 warns on every call that its decoders move to TorchCodec.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")
        self.pre = pre
        self.device = torch.device(device)
        self._torch, self._interpolate = torch, F.interpolate
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.exact_filter = pre.interpolation in INTERPOLATIONS
        self._local = threading.local()
        #: how many images took each path (for logs and tests)
        self.counts = {"device": 0, "pillow": 0}

    def takes(self, header: ImageHeader, data: bytes) -> bool:
        """Whether ``data`` decodes on the device with the Pillow path's semantics."""
        return (self.exact_filter and header.format == "JPEG" and header.mode in ("RGB", "L")
                and not header.progressive and 1 <= header.orientation <= 8
                and data.endswith(_JPEG_END))

    def __call__(self, data: bytes, tta: str = "none") -> torch.Tensor:
        self.pre.crops_per_image(tta)  # refuse a bad tta before any work
        with self._on_own_stream():
            header = read_header(data, limits=self.pre.limits)
            img = self._decode(data, header) if self.takes(header, data) else None
            if img is None:
                self.counts["pillow"] += 1
                return self._torch.from_numpy(self.pre(data, tta)).to(self.device)
            self.counts["device"] += 1
            return self.crops(img, tta)

    @contextlib.contextmanager
    def _on_own_stream(self) -> Iterator[None]:
        """On CUDA, run this thread's work on a stream of its own and finish it before the
        crops are handed on (the runtime reads them from its own stream). Kernels on the
        legacy default stream would also wait for, and hold up, the model's."""
        if self.device.type != "cuda":
            yield
            return
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._torch.cuda.Stream(self.device)
        with self._torch.cuda.stream(stream):
            yield
        stream.synchronize()

    def many(self, images: list[bytes], tta: str = "none") -> list[Any]:
        """One entry per image: its crops, or the typed error it raised (as ``__call__``).

        On CUDA the JPEGs go to nvJPEG in one batched call, several times faster per image
        than one call each (``dev/probes/decode_probe.py``); a batch nvJPEG refuses is retried one
        image at a time, so one damaged file fails alone.
        """
        self.pre.crops_per_image(tta)
        with self._on_own_stream():
            return self._many(images, tta)

    def _many(self, images: list[bytes], tta: str) -> list[Any]:
        out: list[Any] = [None] * len(images)
        batch: list[tuple[int, ImageHeader]] = []
        for i, data in enumerate(images):
            try:
                header = read_header(data, limits=self.pre.limits)
            except ImageError as e:
                out[i] = e
                continue
            if self.takes(header, data):
                batch.append((i, header))
        if len(batch) > 1 and self.device.type == "cuda":
            self._decode_batch(images, batch, tta, out)
        for i, data in enumerate(images):
            if out[i] is None:
                try:
                    out[i] = self(data, tta)
                except ImageError as e:
                    out[i] = e
        return out

    def _decode_batch(self, images: list[bytes], batch: list[tuple[int, ImageHeader]], tta: str,
                      out: list[Any]) -> None:
        raw = [self._torch.frombuffer(bytearray(images[i]), dtype=self._torch.uint8) for i, _ in batch]
        try:
            decoded = self._decode_jpeg(raw, mode=self._rgb, device=self.device)
        except RuntimeError:
            return  # one at a time instead
        for (i, header), img in zip(batch, decoded, strict=True):
            if tuple(img.shape) == (3, header.height, header.width):
                self.counts["device"] += 1
                out[i] = self.crops(_upright(img, header.orientation), tta)

    def _decode(self, data: bytes, header: ImageHeader) -> torch.Tensor | None:
        """Upright (3, H, W) uint8 on the device; None sends the image to Pillow instead."""
        raw = self._torch.frombuffer(bytearray(data), dtype=self._torch.uint8)
        try:
            img = self._decode_jpeg(raw, mode=self._rgb, device=self.device)
        except RuntimeError:  # Pillow decodes it or raises the typed error for it
            return None
        if tuple(img.shape) != (3, header.height, header.width):
            return None
        return _upright(img, header.orientation)

    def crops(self, img: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """(3, H, W) uint8 upright image -> (k, 3, h, w) uint8 crops, as ``Preprocessor.crops``."""
        h, w = self.pre.height, self.pre.width
        resized = self.resize(img, self.pre.edge(tta))
        crops = []
        for top, left, mirrored in windows(tta, resized.shape[-1], resized.shape[-2], w, h):
            crop = resized[:, top : top + h, left : left + w]
            crops.append(crop.flip(-1) if mirrored else crop)
        return self._torch.stack(crops)

    def resize(self, img: torch.Tensor, edge: int) -> torch.Tensor:
        """Shortest edge to ``edge`` with Pillow's antialiasing (torch matches it for
        bilinear and bicubic), rounded back to uint8."""
        height, width = img.shape[-2:]
        new_w, new_h = resized_size(width, height, edge)
        if (new_w, new_h) == (width, height):
            return img
        x = self._interpolate(img[None].float(), size=(new_h, new_w), mode=self.pre.interpolation,
                              antialias=True, align_corners=False)[0]
        return x.round_().clamp_(0, 255).to(self._torch.uint8)


def concat_rows(parts: list[Any]) -> Any:
    """Concatenate crop batches along rows: numpy stays numpy; any tensor makes a tensor on
    that tensor's device (crops Pillow decoded are uploaded to join the device's)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    import torch

    device = next(p.device for p in parts if not isinstance(p, np.ndarray))
    return torch.cat([torch.as_tensor(p).to(device) for p in parts])


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()
