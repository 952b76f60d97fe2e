"""The benchmark's images: real photos shipped with matplotlib and scikit-learn, plus
resized copies from 300 px to 4000 px (JPEG), so decode cost varies as in real traffic."""

from __future__ import annotations

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


def bench_images(out: Path, long_edges: tuple[int, ...] = LONG_EDGES) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = list(PHOTOS)
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
