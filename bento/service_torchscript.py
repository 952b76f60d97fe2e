"""The service on the model's TorchScript artifact (bentofile.torchscript.yaml names this
module): the backend is set before the service module checks the model against it, so that
`bentoml build` refuses a model imported without its TorchScript file."""

import os

os.environ.setdefault("SOTA_SERVE_BACKEND", "torchscript")

from bento.service import SotaServe  # noqa: E402

__all__ = ["SotaServe"]
