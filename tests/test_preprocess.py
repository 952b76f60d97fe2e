"""The card's crops equal torchvision's transforms, pixel for pixel."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sota_serve.errors import BadRequestError
from sota_serve.image.decode import decode_image
from sota_serve.image.preprocess import Preprocessor, resize_center_crop, resized_size, tta_crops
from sota_serve.package.card import ModelCard
from tests.helpers import card_dict, gradient_image

SIZES = [(97, 71), (71, 97), (64, 64), (300, 31), (33, 40)]


def _tv(img: Image.Image, *transforms) -> np.ndarray:
    out = v2.Compose([*transforms, v2.PILToTensor()])(img)
    return out.numpy()


def _images(photos):
    yield from (decode_image(p.read_bytes()) for p in photos)
    yield from (gradient_image(w, h) for w, h in SIZES)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_center_crop_equals_torchvision(photos, interpolation):
    mode = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
            "nearest": v2.InterpolationMode.NEAREST}[interpolation]
    for img in _images(photos):
        ours = np.asarray(resize_center_crop(img, 36, 32, 32, interpolation)).transpose(2, 0, 1)
        theirs = _tv(img, v2.Resize(36, interpolation=mode), v2.CenterCrop(32))
        assert np.array_equal(ours, theirs), img.size


def _stack(crops) -> np.ndarray:
    return np.stack([np.asarray(c).transpose(2, 0, 1) for c in crops])


@pytest.mark.parametrize("crop", [(32, 32), (24, 32), (33, 31)])
def test_tta_policies_equal_torchvision(photos, crop):
    """flip = [CenterCrop, hflip(CenterCrop)], five_crop = FiveCrop, ten_crop = TenCrop, each
    after Resize; odd margins check that the mirrored center crop rounds as torchvision does."""
    h, w = crop
    for img in _images(photos):
        resized = v2.Resize(40)(img)
        center = v2.CenterCrop(crop)(resized)
        expected = {
            "none": _stack([center]),
            "flip": _stack([center, v2.functional.hflip(center)]),
            "five_crop": _stack(v2.FiveCrop(crop)(resized)),
            "ten_crop": _stack(v2.TenCrop(crop)(resized)),
        }
        for policy, theirs in expected.items():
            ours = tta_crops(img, policy, 40, h, w)
            assert ours.dtype == np.uint8 and ours.shape == theirs.shape, (policy, img.size)
            assert np.array_equal(ours, theirs), (policy, img.size, crop)


def test_policies_come_from_the_card():
    full = card_dict(tta={"default": "none", "flip": {"resize_shortest_edge": 36},
                          "ten_crop": {"resize_shortest_edge": 44}})
    pre = Preprocessor.from_card(ModelCard.parse(full))
    assert pre.policies == ("none", "flip", "ten_crop")
    assert [pre.crops_per_image(p) for p in pre.policies] == [1, 2, 10]
    assert pre.edge("ten_crop") == 44
    with pytest.raises(BadRequestError, match="no tta.five_crop settings; use one of none, flip, ten_crop"):
        pre.crops_per_image("five_crop")
    with pytest.raises(BadRequestError, match="unknown tta 'six_crop'"):
        pre.crops_per_image("six_crop")


def test_resized_size_matches_torchvision_arithmetic():
    for w, h in [(640, 427), (427, 640), (1000, 3), (3, 1000), (50, 50)]:
        img = Image.new("RGB", (w, h))
        assert resized_size(w, h, 64) == v2.Resize(64)(img).size


def test_preprocessor_from_card_outputs_uint8_nchw(photos):
    pre = Preprocessor.from_card(ModelCard.parse(card_dict()))
    data = photos[0].read_bytes()
    plain, five = pre(data), pre(data, "five_crop")
    assert plain.shape == (1, 3, 32, 32) and plain.dtype == np.uint8
    assert five.shape == (5, 3, 32, 32) and five.dtype == np.uint8
    assert torch.equal(torch.from_numpy(plain[0]), torch.from_numpy(pre.plain(decode_image(data))[0]))


def test_non_square_crop():
    card = ModelCard.parse(card_dict(input={"height": 24, "width": 32}))
    pre = Preprocessor.from_card(card)
    img = gradient_image(120, 90)
    theirs = _tv(img, v2.Resize(36), v2.CenterCrop((24, 32)))
    assert np.array_equal(pre.plain(img)[0], theirs)
