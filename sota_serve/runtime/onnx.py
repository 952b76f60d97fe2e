"""ONNX Runtime backend. Imports neither torch nor fastai.

The model's output stays on the device (IOBinding) and goes straight into a three-node
"reduce" graph (softmax if needed, reshape to (N, k, C), mean over k) in the same execution
provider, so five-crop TTA copies back only N x C numbers. The same code path runs on CPU.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from sota_serve.device import Device, cuda_device_count, resolve_device
from sota_serve.errors import OnnxRuntimeMissingError, RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.runtime.base import Runtime

try:
    import onnxruntime as ort
except ModuleNotFoundError as e:  # the core install: the runtime is the cpu or gpu extra
    if e.name != "onnxruntime":
        raise
    raise OnnxRuntimeMissingError() from e

# Errors only: ORT >= 1.31 warns on every CUDA session that no plugin EP is registered for
# the (built-in) CUDA provider, before a session's own log level applies.
ort.set_default_logger_severity(3)

_REDUCE_OPSET = 17
log = logging.getLogger(__name__)


def _reduce_graph(num_classes: int, softmax: bool) -> bytes:
    """(N*k, C) scores + int64 shape [-1, k, C] -> (N, C) mean probabilities."""
    nodes = []
    src = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["soft"], axis=-1))
        src = "soft"
    nodes += [
        helper.make_node("Reshape", [src, "shape"], ["grouped"]),
        helper.make_node("ReduceMean", ["grouped"], ["probabilities"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "sota_serve_reduce",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", num_classes]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", num_classes])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _REDUCE_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One pool per session sized by the caller: servers with several workers divide the
    # cores between them instead of each worker spinning up one thread per core.
    opts.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    # Idle intra-op threads would spin-wait and steal the cores that decode images in a server;
    # measured: no loss for the model alone (xresnet50, 2 cores: 20.2 -> 21.4 img/s).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


@functools.cache
def _note_cuda_build_on_cpu() -> None:
    """Once per process: the CUDA build was installed for a GPU this process cannot see (a
    container started without the host's GPU, a machine without a driver), so the line says
    where the model runs and why. The CPU build on a CPU says nothing."""
    log.warning("ONNX Runtime's CUDA build finds no CUDA device (no NVIDIA driver, or no GPU given"
                " to this process): running on the CPU")


def providers_for(device: Device) -> list[str | tuple[str, dict[str, str]]]:
    if device == "cpu":
        if cuda_device_count() == 0 and "CUDAExecutionProvider" in ort.get_available_providers():
            _note_cuda_build_on_cpu()
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeBackendError(
            "a CUDA device is present but this is ONNX Runtime's CPU build; use device 'cpu',"
            " or replace the build: pip uninstall onnxruntime, then pip install 'sota-serve[gpu]'"
        )
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels (the gpu extra, or torch's)
    cuda = {
        "device_id": "0",
        "cudnn_conv_algo_search": "HEURISTIC",  # EXHAUSTIVE re-tunes per new batch size
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


class OnnxRuntime(Runtime):
    backend = "onnx"

    def __init__(
        self,
        model: bytes,
        card: ModelCard,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        super().__init__(card, resolve_device(device))
        opts = session_options(intra_op_threads)
        providers = providers_for(self.device)
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as e:
            raise RuntimeBackendError(f"ONNX Runtime cannot load the model: {e}") from e
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeBackendError(
                "ONNX Runtime fell back to CPU: the CUDA provider failed to load (check the"
                " CUDA/cuDNN libraries); set device=cpu to run on CPU deliberately"
            )
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        softmax = card.output == "logits"
        self._reduce = ort.InferenceSession(
            _reduce_graph(card.num_classes, softmax), sess_options=session_options(1),
            providers=providers,
        )
        self._needs_reduce_alone = softmax
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"
        self.pad_batches = self.device == "cuda"

    def _bind_input(self, binding: ort.IOBinding, x: Any) -> None:
        if isinstance(x, np.ndarray):
            binding.bind_cpu_input(self._input, x)
        elif x.device.type == "cuda" and self.device == "cuda":
            # A torch tensor already on the GPU (decoded there): ORT reads it in place. Its
            # producer may still be writing it on torch's stream; ORT runs on its own.
            import torch

            torch.cuda.current_stream(x.device).synchronize()
            dtype = np.dtype(str(x.dtype).removeprefix("torch."))
            binding.bind_input(self._input, "cuda", x.device.index or 0, dtype, tuple(x.shape), x.data_ptr())
        else:
            binding.bind_cpu_input(self._input, x.cpu().numpy())

    def _run(self, x: Any, crops_per_image: int) -> np.ndarray:
        binding = self.session.io_binding()
        self._bind_input(binding, x)
        binding.bind_output(self._output, self._ort_device)
        self.session.run_with_iobinding(binding)
        scores = binding.get_outputs()[0]
        if crops_per_image == 1 and not self._needs_reduce_alone:
            return np.asarray(scores.numpy(), dtype=np.float32)
        reduce = self._reduce.io_binding()
        reduce.bind_ortvalue_input("scores", scores)
        shape = np.array([-1, crops_per_image, self.card.num_classes], dtype=np.int64)
        reduce.bind_cpu_input("shape", shape)
        reduce.bind_output("probabilities", "cpu")
        self._reduce.run_with_iobinding(reduce)
        return np.asarray(reduce.copy_outputs_to_cpu()[0], dtype=np.float32)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())
