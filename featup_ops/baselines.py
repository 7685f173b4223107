"""Guidance-free upsamplers with the JBU call signature, as baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InterpolationUpsampler(nn.Module):
    """Resizes features by `scale` with torch interpolation; `image` is accepted and ignored."""

    channel_norm = None

    def __init__(self, mode: str = "bilinear", scale: int = 16):
        super().__init__()
        if mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation mode {mode!r}: use bilinear, bicubic or nearest")
        self.mode, self.scale = mode, scale

    def config(self) -> dict:
        return {"kind": self.mode, "scale": self.scale}

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        h, w = features.shape[2:]
        size = (h * self.scale, w * self.scale)
        kwargs = {} if self.mode == "nearest" else {"align_corners": False}
        return F.interpolate(features, size=size, mode=self.mode, **kwargs)


def Bilinear(scale: int = 16) -> InterpolationUpsampler:  # noqa: N802 - reads like a class at call sites
    return InterpolationUpsampler("bilinear", scale)


def Bicubic(scale: int = 16) -> InterpolationUpsampler:  # noqa: N802
    return InterpolationUpsampler("bicubic", scale)
