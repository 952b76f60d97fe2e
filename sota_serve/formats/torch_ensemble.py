"""The weighted sum of member modules that both torch formats save as an ensemble's file
(``torch.export`` traces it, ``torch.jit.script`` compiles it: the loop is written so that
both take it)."""

from __future__ import annotations

from typing import Any


def weighted_sum(modules: list[Any], weights: list[float]) -> Any:
    """``sum(w_i * member_i(pixels))``. The torch.export members are in eval mode already and
    refuse ``.eval()``; the caller sets the mode where its members take it."""
    import torch
    from torch import nn

    class Ensemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(modules)
            self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(0)
            for i, member in enumerate(self.members):
                p = member(pixels) * self.weights[i]
                out = p if i == 0 else out + p
            return out

    return Ensemble()
