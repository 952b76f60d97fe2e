"""ONNX: ``model.onnx``, the card in ``metadata_props``, run by ONNX Runtime.

Written by PyTorch's torch.export-based exporter (``dynamo=True``, which needs the onnxscript
package), with the weights inside the one file. Where that exporter fails on a model (or
onnxscript is missing), the TorchScript-based one writes the file instead, and the log says so;
the card's ``export.onnx_exporter`` names the one that ran. Either file goes through the same
parity check against the eager module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sota_serve.errors import CardError, PackageError
from sota_serve.formats.base import ArtifactFormat
from sota_serve.formats.onnx_members import member_prefix

#: Key under which the card is embedded in an ONNX file's metadata_props.
CARD_KEY = "sota_serve.card"
#: The torch.export-based exporter's lowest opset (it would convert a lower one afterwards).
OPSET = 18

log = logging.getLogger("sota_serve.export")


class OnnxFormat(ArtifactFormat):
    name = "onnx"
    file_name = "model.onnx"
    suffixes = (".onnx",)
    platform = "onnxruntime_onnx"
    precisions = ("fp32", "fp16", "int8")

    def read_card(self, path: Path) -> str:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise PackageError(f"{path}: not a readable ONNX file ({e})") from e
        props = {p.key: p.value for p in model.metadata_props}
        if CARD_KEY not in props:
            raise CardError(
                f"{path}: no sota-serve card in the ONNX metadata (key {CARD_KEY!r}); export"
                " it with sota-serve, or put it in a package directory with a card.json"
            )
        return props[CARD_KEY]

    def check(self, data: bytes, *, source: str) -> None:
        """Refuse graphs whose weights point at files: they could read any path."""
        import onnx
        from onnx.external_data_helper import uses_external_data

        try:
            model = onnx.load_from_string(data)
        except Exception as e:
            raise PackageError(f"{source}: not a readable ONNX file ({e})") from e
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                raise PackageError(
                    f"{source}: tensor {tensor.name!r} keeps its data in an external file; sota-serve"
                    " loads self-contained ONNX files only (re-export with the weights inside)"
                )

    def export(self, module: Any, example: Any, path: Path) -> dict[str, Any]:
        import onnx

        output = "probabilities" if getattr(module, "softmax", True) else "logits"
        try:
            _export_dynamo(module, example, path, output)
            exporter = "dynamo"
        except Exception as e:  # noqa: BLE001 - any failure of the new exporter falls back, said in the log
            log.warning("the torch.export-based ONNX exporter failed (%s: %s); writing %s with the"
                        " TorchScript-based exporter instead", type(e).__name__, str(e).splitlines()[0][:300],
                        path.name)
            path.unlink(missing_ok=True)
            _export_legacy(module, example, path, output)
            exporter = "torchscript"
        onnx.checker.check_model(str(path))
        return {"onnx_opset": OPSET, "onnx_exporter": exporter}

    def embed_card(self, path: Path, card_json: str) -> None:
        import onnx

        model = onnx.load(str(path))
        keep = [p for p in model.metadata_props if p.key != CARD_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
        model.metadata_props.add(key=CARD_KEY, value=card_json)
        onnx.save(model, str(path))

    def quantize(self, fp32: Path, calibration: Sequence[Any], path: Path) -> dict[str, Any]:
        from sota_serve.formats.onnx_int8 import quantize

        return quantize(fp32, calibration, path)

    def combine(self, members: list[bytes], weights: list[float], path: Path) -> None:
        import onnx
        from onnx import TensorProto, compose, helper, numpy_helper, version_converter

        models = [onnx.load_from_string(data) for data in members]
        opset = max(_default_opset(m) for m in models)
        nodes, initializers, outputs = [], [], []
        for i, model in enumerate(models):
            if _default_opset(model) != opset:
                model = version_converter.convert_version(model, opset)
            (source,), (result,) = model.graph.input, model.graph.output
            del model.metadata_props[:]
            prefix = member_prefix(i)
            model = compose.add_prefix(model, prefix)
            for node in model.graph.node:  # every member reads the one shared input
                node.input[:] = ["pixels" if x == f"{prefix}{source.name}" else x for x in node.input]
            weight = numpy_helper.from_array(_scalar(weights[i]), f"{prefix}ensemble_weight")
            nodes += [*model.graph.node,
                      helper.make_node("Mul", [f"{prefix}{result.name}", weight.name], [f"{prefix}weighted"])]
            initializers += [*model.graph.initializer, weight]
            outputs.append(f"{prefix}weighted")
        nodes.append(helper.make_node("Sum", outputs, ["probabilities"]))
        num_classes = models[0].graph.output[0].type.tensor_type.shape.dim[1].dim_value
        graph = helper.make_graph(
            nodes, "sota_serve_ensemble",
            [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", *_chw(models[0])])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", num_classes])],
            initializers,
        )
        combined = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                     producer_name="sota-serve ensemble")
        combined.ir_version = min(m.ir_version for m in models)
        onnx.checker.check_model(combined)
        onnx.save(combined, str(path))


def _export_dynamo(module: Any, example: Any, path: Path, output: str) -> None:
    import torch

    torch.onnx.export(
        module, (example,), str(path),
        input_names=["pixels"], output_names=[output],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,  # one self-contained file (check refuses external weights)
        verbose=False,
    )


def _export_legacy(module: Any, example: Any, path: Path, output: str) -> None:
    import torch

    with warnings.catch_warnings():
        # its own notice that it is the legacy exporter (the log has just said so), and the
        # tracer's deprecation notices; any other warning shows
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is (deprecated|not supported)",
                                category=FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), str(path),
            input_names=["pixels"], output_names=[output],
            dynamic_axes={"pixels": {0: "batch"}, output: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _default_opset(model: Any) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _chw(model: Any) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]


def _scalar(value: float) -> Any:
    import numpy as np

    return np.asarray(value, dtype=np.float32)


ONNX = OnnxFormat()
