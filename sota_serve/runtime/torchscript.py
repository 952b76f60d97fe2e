"""TorchScript backend (imports torch; the ONNX backend does not).

TorchScript archives contain code: load only files from a source you trust. sota-serve
checks the package's sha256 before the bytes reach ``torch.jit.load``.

PyTorch deprecates TorchScript: the first time a process serves a TorchScript file it logs one
line naming the ``pt2`` backend instead (:func:`sota_serve.runtime.load_runtime`), and torch.jit's
own FutureWarning is filtered around the project's calls.
"""

from __future__ import annotations

import io

from sota_serve.errors import RuntimeBackendError
from sota_serve.formats.torchscript import quiet_jit
from sota_serve.package.card import ModelCard
from sota_serve.runtime.torch_module import (  # torch_module says what to install
    TorchModuleRuntime,
    torch,
)


class TorchScriptRuntime(TorchModuleRuntime):
    backend = "torchscript"

    def __init__(
        self,
        model: bytes,
        card: ModelCard,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        """``channels_last``: default on CUDA, where cuDNN's fast (fp16 tensor-core)
        convolutions want NHWC (xresnet50 in torch fp16 channels-last ran ~2x ORT fp32 on an
        H100, BENCHMARKS.md)."""
        super().__init__(card, device=device, intra_op_threads=intra_op_threads)
        try:
            with quiet_jit():
                self.module = torch.jit.load(io.BytesIO(model), map_location=self.torch_device)
        except Exception as e:
            raise RuntimeBackendError(f"torch.jit.load cannot load the model: {e}") from e
        self.module.eval()
        self.channels_last = self.device == "cuda" if channels_last is None else channels_last
        if self.channels_last:  # 4-d weights to NHWC: every convolution then runs and returns NHWC
            self.module = self.module.to(memory_format=torch.channels_last)
