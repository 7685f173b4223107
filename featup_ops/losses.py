"""The multi-view reconstruction loss and the priors of FeatUp (Fu et al., ICLR 2024).

    s = head(lr_view)                                   # uncertainty, (B,1,h,w)
    loss = uncertainty_loss(project(down, P), project(lr_view, P), s)

Heads take `n_models` like the downsamplers (leading parameter axis, batch grouped model-major).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UncertaintyHead(nn.Module):
    """s = exp(conv1x1(C->1)(lr) + 0.1), clamped >= 1e-4: how much a view's low-res pixel can be trusted."""

    def __init__(self, dim: int, n_models: int = 1, init_std: float = 1e-3):
        super().__init__()
        self.dim, self.n_models = dim, n_models
        self.weight = nn.Parameter(torch.randn(n_models, dim) * init_std)
        self.bias = nn.Parameter(torch.zeros(n_models))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.dim() != 4 or lr.shape[1] != self.dim or lr.shape[0] % self.n_models:
            raise ValueError(f"uncertainty head for {self.n_models} x {self.dim}-channel maps got {tuple(lr.shape)}")
        views = lr.shape[0] // self.n_models
        w = self.weight.to(lr.dtype).repeat_interleave(views, 0)
        b = self.bias.to(lr.dtype).repeat_interleave(views, 0)
        logit = torch.einsum("bchw,bc->bhw", lr, w) + b[:, None, None]
        return torch.exp(logit + 0.1).clamp_min(1e-4)[:, None]


def random_projection(dim: int, out_dim: int = 30, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Gaussian (dim, out_dim) matrix, columns scaled by 1/sqrt(dim) so projected norms stay comparable."""
    if dim < 1 or out_dim < 1:
        raise ValueError(f"projection sizes must be >= 1, got {dim} -> {out_dim}")
    p = torch.randn(dim, out_dim, generator=generator, dtype=torch.float32) / dim**0.5
    return p.to(device=device, dtype=dtype)


def project(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """(B,C,h,w) x (C,D) -> (B,D,h,w)."""
    return torch.einsum("bchw,cd->bdhw", x, projection.to(x.dtype))


def uncertainty_loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                     per_model: int | None = None) -> torch.Tensor:
    """mean(|pred - target|^2 / (2 s^2) + log s); with `per_model`=N, a (N,) vector of per-model means."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    terms = (pred - target).square() / (2 * scale.square()) + scale.log()
    if per_model is None:
        return terms.mean()
    return terms.reshape(per_model, -1).mean(1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (both axes), per batch element: (B,)."""
    dy = (x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def gaussian_blur(x: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise separable Gaussian blur with reflect padding."""
    r = size // 2
    t = torch.arange(size, dtype=x.dtype, device=x.device) - r
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = g / g.sum()
    C = x.shape[1]
    x = F.pad(x, [r, r, r, r], mode="reflect")
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)
    return F.conv2d(x, g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)


def blur_prior(x: torch.Tensor) -> torch.Tensor:
    """Mean |blur(x) - x|^2 per batch element: (B,). Penalises high-frequency noise."""
    return (gaussian_blur(x) - x).square().flatten(1).mean(1)


def magnitude_prior(x: torch.Tensor) -> torch.Tensor:
    """Mean squared feature value per batch element: (B,). Keeps unconstrained directions small."""
    return x.square().flatten(1).mean(1)


def smoothness_prior(features: torch.Tensor, guidance: torch.Tensor, samples: int = 256,
                     generator: torch.Generator | None = None, position_sigma: float = 0.1,
                     colour_sigma: float = 0.15, local_sigma: float = 0.005, colour_weight: float = 10.0,
                     local_weight: float = 3.0) -> torch.Tensor:
    """A sampled CRF-like smoothness term: feature differences between random pixel pairs, weighted by a
    bilateral affinity (near in position and colour) plus a purely spatial one. Scalar, mean over pairs.

    Positions are in [-1, 1]; `guidance` (B,3,H',W') is resized to the features' size.
    """
    B, C, H, W = features.shape
    if guidance.shape[2:] != features.shape[2:]:
        guidance = F.interpolate(guidance, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
    n = min(samples, H * W)
    idx = torch.randint(0, H * W, (B, n), generator=generator).to(features.device)
    ys = (idx // W).to(features.dtype) / max(H - 1, 1) * 2 - 1
    xs = (idx % W).to(features.dtype) / max(W - 1, 1) * 2 - 1
    pos = torch.stack([ys, xs], -1)                                            # (B,n,2)
    f = features.flatten(2).gather(2, idx[:, None].expand(B, C, n)).transpose(1, 2)  # (B,n,C)
    g = guidance.flatten(2).gather(2, idx[:, None].expand(B, 3, n).to(guidance.device)).transpose(1, 2)
    g = g.to(features.dtype)
    d_pos = torch.cdist(pos, pos).square()
    d_col = torch.cdist(g, g).square() / 3
    affinity = (colour_weight * torch.exp(-d_pos / (2 * position_sigma**2) - d_col / (2 * colour_sigma**2))
                + local_weight * torch.exp(-d_pos / (2 * local_sigma**2)))
    d_feat = torch.cdist(f, f).square() / C
    return (affinity * d_feat).mean()
