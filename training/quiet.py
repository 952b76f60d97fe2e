"""The exporters' chatter, hidden for the length of an export and no longer.

``sota-serve train`` logs at INFO, and torch's ONNX exporter and the onnxscript and onnx_ir
passes it runs log at INFO and WARNING and warn about each rewrite, fold and pass: a dozen
lines per exported file that say nothing about the package. The export's own steps and its
parity check say what matters; records at ERROR and exceptions still show.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: The loggers of the libraries that torch.onnx.export, torch.export and torch.jit run.
EXPORT_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
                  "onnxscript", "onnx_ir")
#: The modules whose warnings are hidden (regular expressions of warnings.filterwarnings).
_WARNING_MODULES = r"(torch\.onnx|torch\.export|torch\._export|torch\._dynamo|torch\.fx|onnxscript|onnx_ir)(\.|$)"


@contextmanager
def quiet_export() -> Iterator[None]:
    """Within the block, the exporters' loggers pass ERROR and above only and their warnings
    are not shown; afterwards both are as they were."""
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_WARNING_MODULES)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
