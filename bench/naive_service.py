"""The peer: the same model served the way BentoML tutorials do it.

One image per request, a PIL-typed parameter, torchvision transforms, torch eager on the
network rebuilt from the package's TorchScript weights, no batching. Used only by the
benchmark (``bentoml serve bench.naive_service:NaiveClassifier``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import bentoml
from PIL.Image import Image

with bentoml.importing():
    import torch
    from torchvision import transforms as T

PACKAGE = Path(os.environ.get("SOTA_SERVE_MODEL", "packages/sota-demo"))


@bentoml.service(name="naive_classifier")
class NaiveClassifier:
    def __init__(self) -> None:
        from bench.models import architecture_of, build_model
        from sota_serve.package.card import ModelCard

        card = ModelCard.load(PACKAGE / "card.json")
        scripted = torch.jit.load(io.BytesIO((PACKAGE / "model.pt").read_bytes()), map_location="cpu")
        weights = {k.removeprefix("model."): v for k, v in scripted.state_dict().items()
                   if k.startswith("model.")}
        self.model = build_model(architecture_of(card), card.num_classes)
        self.model.load_state_dict(weights)
        self.model.eval()
        self.labels = card.labels
        self.transform = T.Compose([
            T.Resize(card.preprocess.resize_shortest_edge),
            T.CenterCrop((card.input.height, card.input.width)),
            T.ToTensor(),
            T.Normalize(card.normalization.mean, card.normalization.std),
        ])

    @bentoml.api
    def classify(self, image: Image) -> dict:
        x = self.transform(image.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            probs = self.model(x).softmax(-1)[0]
        top = probs.topk(min(5, len(self.labels)))
        return {"predictions": [{"label": self.labels[i], "score": float(s)}
                                for s, i in zip(top.values, top.indices, strict=True)]}

