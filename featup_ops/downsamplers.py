"""Learned downsamplers: high-res features (B,C,H,W) -> the backbone's grid (B,C,h,w), H = h*k.

They model how the backbone pools a k x k patch, so that downsampled upsampler output can be compared
with the backbone's own low-res features (FeatUp, Fu et al., ICLR 2024). k is the upsampler's scale (16), which is
not the backbone's patch size in general. Both take `n_models`: their parameters carry a leading axis so
that N independent models (the batched implicit fitter) run in one call on a batch of N*V maps, grouped
model-major (the first V maps belong to model 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import gaussian_blur


def _check(hr: torch.Tensor, out_size: tuple[int, int], k: int, n_models: int) -> tuple[int, int]:
    if hr.dim() != 4:
        raise ValueError(f"downsampler expects (B,C,H,W), got {tuple(hr.shape)}")
    h, w = out_size
    if tuple(hr.shape[2:]) != (h * k, w * k):
        raise ValueError(f"high-res features {tuple(hr.shape[2:])} are not {k}x the target grid {(h, w)}: "
                         f"this downsampler pools {k}x{k} patches")
    if hr.shape[0] % n_models:
        raise ValueError(f"batch {hr.shape[0]} is not a multiple of the {n_models} models")
    return h, w


def area_downsample(hr: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """The fixed reference: average over each patch (what evaluation uses)."""
    return F.adaptive_avg_pool2d(hr, out_size)


def _tile(taps: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """Per-sample patch weights (B, k*k) -> a (B,1,h*k,w*k) map repeating them in every patch."""
    return taps.reshape(-1, 1, 1, k, 1, k).expand(-1, 1, h, k, w, k).reshape(-1, 1, h * k, w * k)


def _patch_softmax(logits: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """Softmax within each k x k patch of a (B,1,h*k,w*k) map, returned in the same layout."""
    B = logits.shape[0]
    x = logits.reshape(B, h, k, w, k)
    x = x - x.amax(dim=(2, 4), keepdim=True).detach()
    e = x.exp()
    return (e / e.sum(dim=(2, 4), keepdim=True)).reshape(B, 1, h * k, w * k)


def _weighted_pool(hr: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """sum over each k x k patch of hr * weights (weights (B,1,H,W) sum to 1 per patch)."""
    return F.avg_pool2d(hr * weights, k) * (k * k)


class SimpleDownsampler(nn.Module):
    """One learned k x k blur per model (|weights|, normalised), applied on non-overlapping k x k patches.

    Starts as the area average, which is exactly how a patch-averaging backbone pools.
    """

    def __init__(self, kernel_size: int = 16, n_models: int = 1):
        super().__init__()
        self.kernel_size, self.n_models = kernel_size, n_models
        self.weight = nn.Parameter(torch.ones(n_models, kernel_size * kernel_size))

    def kernel(self) -> torch.Tensor:
        w = self.weight.abs()
        return w / w.sum(-1, keepdim=True).clamp_min(1e-8)

    def forward(self, hr: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        h, w = _check(hr, out_size, self.kernel_size, self.n_models)
        views = hr.shape[0] // self.n_models
        kernel = self.kernel().to(hr.dtype).repeat_interleave(views, 0)  # (B, k*k)
        return _weighted_pool(hr, _tile(kernel, h, w, self.kernel_size), self.kernel_size)


class AttentionDownsampler(nn.Module):
    """Per-patch softmax weights: logit = (linear(blurred features) * w_tap + b_tap), softmax over the patch.

    w_tap starts near 1 and b_tap near 0, the linear map near 0: the first downsampling is about the area
    average, and the network learns where in a patch the backbone looks. The linear map is applied before
    the blur (they commute), so only a one-channel map is blurred; dropout drops whole channels of the
    linear map per sample.
    """

    def __init__(self, dim: int, kernel_size: int = 16, n_models: int = 1, blur: bool = True,
                 dropout: float = 0.2):
        super().__init__()
        self.dim, self.kernel_size, self.n_models, self.blur = dim, kernel_size, n_models, blur
        taps = kernel_size * kernel_size
        self.dropout = nn.Dropout(dropout)
        self.logit_weight = nn.Parameter(torch.randn(n_models, dim) * (0.1 / dim**0.5))
        self.logit_bias = nn.Parameter(torch.zeros(n_models))
        self.tap_weight = nn.Parameter(torch.ones(n_models, taps) + 0.01 * torch.randn(n_models, taps))
        self.tap_bias = nn.Parameter(0.01 * torch.randn(n_models, taps))

    def forward(self, hr: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        h, w = _check(hr, out_size, self.kernel_size, self.n_models)
        if hr.shape[1] != self.dim:
            raise ValueError(f"this AttentionDownsampler was built for {self.dim} channels, got {hr.shape[1]}")
        views = hr.shape[0] // self.n_models
        k = self.kernel_size
        weight = self.dropout(self.logit_weight.to(hr.dtype).repeat_interleave(views, 0))
        bias = self.logit_bias.to(hr.dtype).repeat_interleave(views, 0)
        logits = torch.einsum("bchw,bc->bhw", hr, weight)[:, None] + bias[:, None, None, None]
        if self.blur:
            logits = gaussian_blur(logits)
        tap_w = _tile(self.tap_weight.to(hr.dtype).repeat_interleave(views, 0), h, w, k)
        tap_b = _tile(self.tap_bias.to(hr.dtype).repeat_interleave(views, 0), h, w, k)
        attention = _patch_softmax(logits * tap_w + tap_b, h, w, k)
        return _weighted_pool(hr, attention, k)


class AreaDownsampler(nn.Module):
    """The fixed area average (no parameters): exact for backbones that average their patches (the oracle),
    and it leaves the upsampler no learned pooling to hide errors behind."""

    def __init__(self, kernel_size: int = 16, n_models: int = 1):
        super().__init__()
        self.kernel_size, self.n_models = kernel_size, n_models

    def forward(self, hr: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        _check(hr, out_size, self.kernel_size, self.n_models)
        return area_downsample(hr, out_size)


DOWNSAMPLERS = ("attention", "simple", "area")


def create_downsampler(kind: str, dim: int, kernel_size: int = 16, n_models: int = 1) -> nn.Module:
    """'attention' or 'simple' (the learned ones of FeatUp's configs), or 'area' (fixed average)."""
    if kind == "area":
        return AreaDownsampler(kernel_size, n_models)
    if kind == "simple":
        return SimpleDownsampler(kernel_size, n_models)
    if kind == "attention":
        return AttentionDownsampler(dim, kernel_size, n_models)
    raise ValueError(f"unknown downsampler {kind!r}: use one of {', '.join(DOWNSAMPLERS)}")
