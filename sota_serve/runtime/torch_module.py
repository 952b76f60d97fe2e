"""What the torch backends (``pt2``, ``torchscript``) share: a module that takes uint8 NCHW
pixels and returns scores, run on one device under ``inference_mode``, crops averaged per
image. Each backend loads its own file into :attr:`TorchModuleRuntime.module`."""

from __future__ import annotations

from typing import Any

import numpy as np

from sota_serve.device import resolve_device
from sota_serve.errors import RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.runtime.base import Runtime

try:
    import torch
except ImportError as e:  # pragma: no cover - torch is a dependency of the torch extras
    raise RuntimeBackendError("the torch backends need torch; pip install 'sota-serve[torchscript]',"
                              " or use backend 'onnx'") from e


class TorchModuleRuntime(Runtime):
    #: NHWC input for modules whose weights were made channels-last
    channels_last = False

    def __init__(self, card: ModelCard, *, device: str, intra_op_threads: int | None) -> None:
        super().__init__(card, resolve_device(device))
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        self.torch_device = torch.device(self.device)
        self._softmax = card.output == "logits"
        self.pad_batches = self.device == "cuda"
        self.module: Any = None

    def _run(self, x: Any, crops_per_image: int) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.as_tensor(x).to(self.torch_device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            scores = self.module(batch).float()
            if self._softmax:
                scores = scores.softmax(dim=-1)
            if crops_per_image > 1:
                scores = scores.view(-1, crops_per_image, scores.shape[-1]).mean(dim=1)
            return scores.cpu().numpy()
