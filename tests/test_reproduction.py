"""A third party reproduces `sota-serve predict` from card.json + model.onnx alone.

Only Pillow, torchvision, numpy and onnxruntime are used here, following the card's written
semantics (see the design notes); no sota_serve code is imported.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps
from torchvision.transforms import v2

FILTERS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def third_party_predict(package: Path, image: Path, tta: str) -> np.ndarray:
    card = json.loads((package / "card.json").read_text())
    session = ort.InferenceSession(str(package / card["artifacts"]["onnx"]["path"]),
                                   providers=["CPUExecutionProvider"])
    img = Image.open(image)
    if card["preprocess"]["exif_transpose"]:
        img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    size = (card["input"]["height"], card["input"]["width"])
    mode = FILTERS[card["preprocess"]["interpolation"]]
    edge = card["preprocess"]["resize_shortest_edge"] if tta == "none" else card["tta"][tta]["resize_shortest_edge"]
    resized = v2.Resize(edge, interpolation=mode)(img)
    if tta == "flip":
        center = v2.CenterCrop(size)(resized)
        crops = [center, v2.functional.hflip(center)]
    elif tta == "five_crop":
        crops = list(v2.FiveCrop(size)(resized))
    elif tta == "ten_crop":
        crops = list(v2.TenCrop(size)(resized))
    else:
        crops = [v2.CenterCrop(size)(resized)]
    batch = np.stack([np.asarray(c).transpose(2, 0, 1) for c in crops]).astype(np.uint8)
    assert card["normalization"]["in_graph"] and card["output"] == "probabilities"
    probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
    return probs.mean(0)


@pytest.mark.parametrize("tta", ["none", "flip", "five_crop", "ten_crop"])
def test_third_party_equals_cli(tiny_package, photos, tta):
    out = subprocess.run(
        [sys.executable, "-m", "sota_serve.cli", "predict", str(tiny_package), *map(str, photos),
         "--tta", tta, "--top-k", "3", "--json", "--device", "cpu"],
        check=True, capture_output=True, text=True,
    )
    results = json.loads(out.stdout)
    labels = json.loads((tiny_package / "card.json").read_text())["labels"]
    assert [r["image"] for r in results] == [str(p) for p in photos]
    for result, photo in zip(results, photos, strict=True):
        probs = third_party_predict(tiny_package, photo, tta)
        ours = {p["label"]: p["score"] for p in result["predictions"]}
        assert result["predictions"][0]["label"] == labels[int(probs.argmax())]
        for i, label in enumerate(labels):
            assert abs(ours[label] - float(probs[i])) < 1e-5
