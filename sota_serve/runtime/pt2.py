"""torch.export backend: ``model.pt2`` through ``torch.export.load`` (imports torch; the ONNX
backend does not).

The archive is checked first (sha256 against the card, then no pickled entry, see
:mod:`sota_serve.formats.pt2`); what runs is the exported graph of registered torch operators.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from sota_serve.errors import RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.runtime.base import Runtime

try:
    import torch
except ImportError as e:  # pragma: no cover - torch is a dependency
    raise RuntimeBackendError("the pt2 backend needs torch; pip install torch, or use backend 'onnx'") from e

from sota_serve.device import resolve_device


class Pt2Runtime(Runtime):
    backend = "pt2"

    def __init__(
        self,
        model: bytes,
        card: ModelCard,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        super().__init__(card, resolve_device(device))
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        self._torch_device = torch.device(self.device)
        try:
            program = torch.export.load(io.BytesIO(model))
            # the exported graph is already in eval mode (an unlifted module refuses .eval())
            self.module = program.module().to(self._torch_device)
        except Exception as e:
            raise RuntimeBackendError(f"torch.export.load cannot load the model: {e}") from e
        self._softmax = card.output == "logits"
        self.pad_batches = self.device == "cuda"

    def _run(self, x: Any, crops_per_image: int) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.as_tensor(x).to(self._torch_device, non_blocking=True)
            scores = self.module(batch).float()
            if self._softmax:
                scores = scores.softmax(dim=-1)
            if crops_per_image > 1:
                scores = scores.view(-1, crops_per_image, scores.shape[-1]).mean(dim=1)
            return scores.cpu().numpy()
