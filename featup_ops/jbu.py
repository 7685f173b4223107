"""The JBU upsampler: joint bilateral upsampling with a learned range kernel, stacked 2x stages.

FeatUp's JBU layer (Fu et al., ICLR 2024, Sec. 3.2). The per-pixel filtering runs on `cuda_ext.adaptive_conv` and the
range kernel's neighbourhood dot products on `cuda_ext.local_dot`, so no (B, C, 49, H, W) tensor is
ever materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cuda_ext

from .layers import ChannelNorm


class JBULayer(nn.Module):
    """One 2x stage: upsample `source` (B,C,h,w) to the size of `guidance` (B,3,2h,2w)."""

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3):
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        taps = self.diameter**2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Dropout2d(0.1), nn.Conv2d(key_dim, key_dim, 1)
        )
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(taps + guidance_dim, taps, 1), nn.GELU(), nn.Dropout2d(0.1), nn.Conv2d(taps, taps, 1)
        )

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [self.radius] * 4, mode="reflect")

    def range_kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """Softmax over the k*k taps of temperature-scaled key similarities -> (B, k*k, H, W)."""
        keys = self.range_proj(guidance)
        B, _, H, W = keys.shape
        logits = cuda_ext.local_dot(keys, self._pad(keys)).reshape(B, H, W, -1).permute(0, 3, 1, 2)
        temperature = self.range_temp.exp().clamp(1e-4, 1e4)
        return torch.softmax(temperature * logits, dim=1)

    def spatial_kernel(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Gaussian over the tap offsets on a [-1, 1] grid -> (1, k*k, 1, 1)."""
        offsets = torch.linspace(-1, 1, self.diameter, dtype=dtype, device=device)
        dist2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
        return torch.exp(-dist2 / (2 * self.sigma_spatial.to(dtype) ** 2)).reshape(1, -1, 1, 1)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        B, _, H, W = guidance.shape
        if source.shape[0] != B:
            raise ValueError(f"source batch {source.shape[0]} != guidance batch {B}")
        kernel = self.range_kernel(guidance) * self.spatial_kernel(guidance.dtype, guidance.device)
        kernel = kernel / kernel.sum(dim=1, keepdim=True).clamp_min(1e-7)
        kernel = kernel + 0.1 * self.fixup_proj(torch.cat([kernel, guidance], dim=1))
        kernel = kernel.permute(0, 2, 3, 1).reshape(B, H, W, self.diameter, self.diameter)
        upsampled = F.interpolate(source, size=(H, W), mode="bicubic", align_corners=False)
        return cuda_ext.adaptive_conv(self._pad(upsampled), kernel.to(upsampled.dtype).contiguous())


class JBUStack(nn.Module):
    """`stages` JBU layers (2**stages x; 4 = 16x) and a residual 1x1 fix-up, called as up(features, image).

    `image` is the mean/std-normalised RGB image at any size; each stage sees it average-pooled to its
    own output size. `channel_norm`, when set, is the per-pixel LayerNorm the upsampler was trained
    behind: the caller applies it to backbone features (`normalize_features`) before `forward`.
    """

    def __init__(self, dim: int, stages: int = 4, key_dim: int = 32, radius: int = 3,
                 channel_norm: ChannelNorm | None = None):
        super().__init__()
        if not 1 <= stages <= 6:
            raise ValueError(f"stages must be between 1 and 6 (2x to 64x), got {stages}")
        self.dim, self.stages, self.key_dim, self.radius = dim, stages, key_dim, radius
        for n in range(1, stages + 1):
            self.add_module(f"up{n}", JBULayer(3, key_dim, radius))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, 1))
        self.channel_norm = channel_norm

    @property
    def scale(self) -> int:
        return 2**self.stages

    def config(self) -> dict:
        return {"kind": "jbu", "dim": self.dim, "stages": self.stages, "key_dim": self.key_dim,
                "radius": self.radius, "channel_norm": self.channel_norm is not None}

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.channel_norm is None else self.channel_norm(features)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected features (B,C,h,w) and image (B,3,H,W), got {tuple(features.shape)} "
                             f"and {tuple(image.shape)}")
        if features.shape[1] != self.dim:
            raise ValueError(f"this JBUStack was built for {self.dim} channels, got features with {features.shape[1]}")
        x = features
        for n in range(1, self.stages + 1):
            h, w = x.shape[2:]
            guidance = F.adaptive_avg_pool2d(image, (2 * h, 2 * w)).to(x.dtype)
            x = getattr(self, f"up{n}")(x, guidance)
        return x + 0.1 * self.fixup_proj(x)
