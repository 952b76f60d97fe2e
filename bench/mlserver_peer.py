"""The MLServer peer: the same package served by MLServer 1.7 as a custom runtime.

MLServer (Seldon) serves the Open Inference Protocol over REST and gRPC, like sota-serve. This
runtime opens the package with sota-serve's own code (``Classifier.open``: the same ONNX
Runtime session settings, the same artifact that sota-serve's ``precision=auto`` picks, the same
decode and preprocessing), takes the request sota-serve takes (input ``image``, BYTES, shape
[N], the encoded JPEG/PNG files) and answers ``probabilities``, FP32 [N, C], so the comparison
is between serving designs, not between models or decoders. Over gRPC the files arrive as
``raw_input_contents`` (as sota-serve takes them); MLServer's REST has no binary-tensor
extension, so over REST they arrive as base64 strings in JSON with the input's ``content_type``
parameter ``base64`` (MLServer's ``Base64Codec``), which sota-serve's REST ``infer`` also takes.

MLServer's venv is its own (its pins conflict with the project's): ``make mlserver-peer``
makes ``bench/.cache/mlserver-venv`` with ``mlserver==1.7.*`` and this checkout's core with
the CPU runtime (``pip install -e '.[cpu]'``). Only that venv imports this module: MLServer
loads it by the ``implementation`` path that :func:`bench.server.mlserver_settings` writes
into ``model-settings.json``, and ``Server.mlserver`` starts ``mlserver start`` on that folder.

The settings, all MLServer's public ones (``settings.json`` / ``model-settings.json``):

* adaptive batching on (``max_batch_size`` 32, ``max_batch_time`` 0.01 s), as MLServer's
  adaptive-batching guide sets it (``model-settings.json``): 32 images per
  model call as sota-serve's CPU default and the LitServe peer's, 10 ms as the LitServe
  peer's ``batch_timeout``. MLServer merges the requests of a batch into one request
  (``image`` of shape [n]), calls :meth:`PackageModel.predict` once and splits the answer.
* ``parallel_workers``: MLServer's way to run model calls at once. With N > 0 its main process
  decodes the protocol and sends each batch to one of N worker processes (round robin), which
  decodes the images and runs the model, one batch at a time; with 0 the main process does it
  all. The cores are shared among the model calls at once (``threads``, ONNX Runtime's
  intra-op threads), as sota-serve shares them: 2 workers of 1 thread each on 2 cores (one
  model call per core, sota-serve's split), 0 workers with 2 threads. Neither wins
  everywhere: over gRPC on the demo (BENCHMARKS.md), 0 workers served 1.34x the requests of 2
  at 32 clients (a batch holds all 32 clients' requests, which leaves a second worker little
  to do while the hand-over to a worker costs) and 2 workers 1.25x those of 0 at 128 clients;
  in rounds of the settings alone, 1 worker of 2 threads (MLServer's default) served less than
  the better of the two at both. ``python -m dev.probes.grpc_probe --mlserver
  --mlserver-workers 0,2`` runs both as peers.
* gRPC and REST on free ports, metrics (MLServer's default, on) on a third, and no access log
  line per request, as sota-serve's default (``logging_settings``: MLServer 1.7.1 asks uvicorn
  for none, yet with its metrics server on, uvicorn logs every request).
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, TensorData

from sota_serve.classifier import Classifier


class PackageModel(MLModel):
    """A sota-serve package: ``parameters.uri`` is its folder, ``parameters.extra`` holds
    ``precision`` and ``threads`` (ONNX Runtime intra-op threads per worker)."""

    async def load(self) -> bool:
        parameters = self.settings.parameters
        extra = parameters.extra or {}
        self.clf = Classifier.open(parameters.uri, precision=extra.get("precision", "auto"),
                                   intra_op_threads=extra.get("threads"))
        self.tta = self.clf.policy(None)  # the card's default, as sota-serve serves a request without one
        self.k = self.clf.preprocessor.crops_per_image(self.tta)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        (image,) = [i for i in payload.inputs if i.name == "image"]
        # base64 strings (REST, content_type base64) decoded to bytes; raw gRPC contents as they are
        data = self.decode(image)
        files = data.root if isinstance(data, TensorData) else data
        crops = np.concatenate([self.clf.preprocessor(f, self.tta) for f in files])
        probs = self.clf.runtime.predict(crops, crops_per_image=self.k).astype(np.float32, copy=False)
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output("probabilities", probs)])
