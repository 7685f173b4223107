"""Small building blocks shared by the backbones and upsamplers."""

from __future__ import annotations

import torch
from torch import nn


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of a (B,C,H,W) map, independently at every pixel.

    FeatUp wraps each backbone in it; published JBU checkpoints store it as `model.1.norm.*`.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
