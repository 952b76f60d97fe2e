"""The LitServe peer: the same package served by LitServe with its own batching.

Same ONNX Runtime session settings and the same decode/preprocess code as sota-serve, so the
comparison is between serving designs, not between models or decoders. LitServe decodes
each request in its inference worker (``decode_request``), batches up to ``max_batch_size``
requests waiting at most ``batch_timeout`` seconds, and runs one ``predict`` per batch.
Model calls at once come from ``--workers-per-device`` processes, each with its share of the
cores as intra-op threads (as sota-serve's ``SOTA_SERVE_MODEL_THREADS`` divides them).

``python -m bench.litserve_peer PACKAGE --port P [--tta none|five_crop] [--workers-per-device N]``
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import numpy as np

from sota_serve.predictions import top_k_predictions


class PackageAPI(ls.LitAPI):
    def __init__(self, package: str, tta: str, precision: str = "auto", threads: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.package_dir, self.tta, self.precision, self.threads = package, tta, precision, threads

    def setup(self, device: str) -> None:
        from sota_serve.classifier import Classifier

        self.clf = Classifier.open(self.package_dir, device="cuda" if device.startswith("cuda") else "cpu",
                                   precision=self.precision, intra_op_threads=self.threads)
        self.k = self.clf.preprocessor.crops_per_image(self.tta)

    def decode_request(self, request) -> np.ndarray:
        return self.clf.preprocessor(request["image"].file.read(), self.tta)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.clf.runtime.predict(x, crops_per_image=self.k)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        probs = output.reshape(-1, self.clf.card.num_classes)[0]  # (C,) batched, (1, C) when not
        preds = top_k_predictions(probs, self.clf.card.labels, min(5, self.clf.card.num_classes))
        return {"predictions": [p.model_dump() for p in preds]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.litserve_peer")
    p.add_argument("package")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tta", default="none")
    p.add_argument("--precision", default="auto", help="as sota-serve's (auto: fp16 on a GPU, int8 on a CPU, when the card allows)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.01)
    p.add_argument("--workers-per-device", type=int, default=1,
                   help="inference worker processes (LitServe's way to run model calls at once)")
    p.add_argument("--threads", type=int,
                   help="ORT intra-op threads per worker (default: the cores divided among the workers)")
    args = p.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers_per_device)
    api = PackageAPI(args.package, args.tta, args.precision, threads, max_batch_size=args.max_batch_size,
                     batch_timeout=args.batch_timeout, api_path="/classify")
    server = ls.LitServer(api, accelerator="auto", workers_per_device=args.workers_per_device, timeout=120)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False)


if __name__ == "__main__":
    main()
