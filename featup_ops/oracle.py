"""The `oracle` backbone: per-pixel features with a known high-resolution truth.

    f(x) = tanh(3 * W2 @ tanh(3 * W1 @ x))

x is a pixel's normalised RGB (ImageNet mean/std); W1 (32x3) = N(0,1)/2 then W2 (Cx32) = N(0,1)/5 are
drawn in that order from a torch.Generator seeded with `seed` (1 by default). The backbone's output is f
average-pooled over 16x16 patches; the truth at any resolution is f of the image resized to that resolution.
Like semantic features it depends on what is at a pixel: smooth within regions, sharp at their borders.
This is how the project proves an upsampler works. Other seeds and widths C give other, equally known
feature maps: they stand for different backbones (`create_backbone("oracle", seed=7, dim=48)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneError, register_backbone
from .model import UpsamplerError, register_upsampler

HIDDEN = 32
SEED = 1


def oracle_weights(dim: int = 32, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1 (32,3), W2 (dim,32)) exactly as defined above."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(HIDDEN, 3, generator=g) / 2
    w2 = torch.randn(dim, HIDDEN, generator=g) / 5
    return w1, w2


class OracleBackbone(Backbone):
    """Known-truth features: f per pixel, average-pooled over patch_size x patch_size patches."""

    def __init__(self, dim: int = 32, patch_size: int = 16, seed: int = SEED):
        super().__init__("oracle", dim, patch_size, IMAGENET_MEAN, IMAGENET_STD, weights_id=f"oracle:C{dim}:seed{seed}")
        self.seed = seed
        w1, w2 = oracle_weights(dim, seed)
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)

    def pixel_features(self, x: torch.Tensor) -> torch.Tensor:
        """f at every pixel of a normalised image (B,3,H,W) -> (B,dim,H,W)."""
        hidden = torch.tanh(3 * torch.einsum("oc,bchw->bohw", self.w1.to(x.dtype), x))
        return torch.tanh(3 * torch.einsum("oc,bchw->bohw", self.w2.to(x.dtype), hidden))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid_size(*x.shape[2:])
        f = self.pixel_features(x[:, :, : h * self.patch_size, : w * self.patch_size])
        return F.avg_pool2d(f, self.patch_size)

    def true_features(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The truth at `size` (default: the image's own): f of the image resized (bilinear, antialiased)."""
        if size is not None and tuple(size) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return self.pixel_features(x)


@register_backbone("oracle")
def create_oracle(weights: str | None = None, random_init: bool = False,
                  storage_options: Mapping[str, Any] | None = None, dim: int = 32,
                  patch_size: int = 16, seed: int = SEED) -> OracleBackbone:
    """Weights-free known-truth backbone (32 channels, stride 16, seed 1 unless told) for tests and evaluation."""
    if weights is not None:
        raise BackboneError("the oracle backbone is defined by its seed and takes no weights file; pass seed=N "
                            "(and dim=C) for another oracle")
    for name, value in (("dim", dim), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BackboneError(f"oracle {name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BackboneError(f"oracle seed must be an integer >= 0, got {seed!r}")
    return OracleBackbone(dim, patch_size, seed).eval().requires_grad_(False)


# -- known-truth segmentation labels -------------------------------------------------------------------------
LABEL_CLASSES = 8
LABEL_SEED = 2


def oracle_label_weights(dim: int = 32) -> torch.Tensor:
    """The fixed linear map (8, dim) from oracle features to class scores, from a Generator seeded with 2."""
    return torch.randn(LABEL_CLASSES, dim, generator=torch.Generator().manual_seed(LABEL_SEED))


def oracle_labels(x: torch.Tensor, size: tuple[int, int] | None = None, dim: int = 32) -> torch.Tensor:
    """Per-pixel class (B, H, W) int64: argmax over 8 classes of the fixed map applied to the true
    high-res oracle features of the normalised image `x` at `size` (default: the image's own)."""
    oracle = OracleBackbone(dim).to(x.device)
    feats = oracle.true_features(x, size)
    scores = torch.einsum("kc,bchw->bkhw", oracle_label_weights(dim).to(x.device, x.dtype), feats)
    return scores.argmax(dim=1)


class TrueFeatures(torch.nn.Module):
    """The `truth` upsampler: the oracle's exact high-res features, the ceiling any upsampler aims for."""

    needs_backbone = True
    channel_norm = None

    def __init__(self, scale: int = 16):
        super().__init__()
        self.scale = scale

    def config(self) -> dict:
        return {"kind": "truth", "scale": self.scale}

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, features: torch.Tensor, guidance: torch.Tensor, backbone: Backbone | None = None,
                images: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(backbone, OracleBackbone):
            raise UpsamplerError(f"the truth upsampler exists only for the oracle backbone, not {backbone!r}")
        h, w = features.shape[2:]
        return backbone.true_features(guidance, (h * self.scale, w * self.scale))


@register_upsampler("truth", "the oracle backbone's exact high-res features (evaluation ceiling; oracle only)")
def _create_truth(dim: int, weights: str | None = None, random_init: bool = False,
                  storage_options: Mapping[str, Any] | None = None, scale: int = 16) -> TrueFeatures:
    if weights is not None:
        raise UpsamplerError("the truth upsampler takes no weights")
    return TrueFeatures(scale)
