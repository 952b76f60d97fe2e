"""torch.export backend: ``model.pt2`` through ``torch.export.load`` (imports torch; the ONNX
backend does not).

The archive is checked first (sha256 against the card, then no pickled entry, no entry name
stored twice and one root folder, see
:mod:`sota_serve.formats.pt2`); what runs is the exported graph of registered torch operators.
"""

from __future__ import annotations

import io

from sota_serve.errors import RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.runtime.torch_module import (  # torch_module says what to install
    TorchModuleRuntime,
    torch,
)


class Pt2Runtime(TorchModuleRuntime):
    backend = "pt2"

    def __init__(
        self,
        model: bytes,
        card: ModelCard,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        super().__init__(card, device=device, intra_op_threads=intra_op_threads)
        try:
            program = torch.export.load(io.BytesIO(model))
            # the exported graph is already in eval mode (an unlifted module refuses .eval())
            self.module = program.module().to(self.torch_device)
        except Exception as e:
            raise RuntimeBackendError(f"torch.export.load cannot load the model: {e}") from e
