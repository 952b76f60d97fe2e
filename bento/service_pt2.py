"""The service on the model's torch.export artifact, model.pt2 (bentofile.pt2.yaml names this
module): the backend is set before the service module checks the model against it, so that
`bentoml build` refuses a model imported without its pt2 file."""

import os

os.environ.setdefault("SOTA_SERVE_BACKEND", "pt2")

from bento.service import SotaServe  # noqa: E402

__all__ = ["SotaServe"]
