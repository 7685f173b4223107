"""AnyUp's building blocks, named as in the published checkpoints (Wimmer et al., "AnyUp: Universal Feature
Upsampling", ICLR 2026): residual blocks, encoders, the feature-unification layer, RoPE and the attention
projections. `featup_ops.anyup.AnyUp` assembles them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8  # GroupNorm groups in every residual block


def conv(in_dim: int, out_dim: int, kernel_size: int = 1) -> nn.Conv2d:
    """A bias-free convolution with reflect padding kernel_size // 2 (AnyUp's only kind but one).

    A 1x1 convolution has no padding: it is built without the padding mode, which would copy its input.
    """
    mode = "reflect" if kernel_size > 1 else "zeros"
    return nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, padding_mode=mode, bias=False)


class ResBlock(nn.Module):
    """[GroupNorm, SiLU, conv] x 2 plus a shortcut (1x1 conv when the width changes, else identity)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 1):
        super().__init__()
        self.block = nn.Sequential(  # the activations overwrite the fresh norm outputs: no extra copies
            nn.GroupNorm(GROUPS, in_dim, eps=1e-5), nn.SiLU(inplace=True), conv(in_dim, out_dim, kernel_size),
            nn.GroupNorm(GROUPS, out_dim, eps=1e-5), nn.SiLU(inplace=True), conv(out_dim, out_dim, kernel_size),
        )
        self.shortcut = conv(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x).add_(self.shortcut(x))


def encoder(in_dim: int, dim: int, kernel_size: int = 1) -> nn.Sequential:
    """conv(in_dim -> dim, kernel_size) followed by two width-`dim` residual blocks."""
    return nn.Sequential(conv(in_dim, dim, kernel_size), ResBlock(dim, dim), ResBlock(dim, dim))


class FeatureUnification(nn.Module):
    """Any number of input channels -> `dim` channels, independent of the channel count and order.

    Every input channel is correlated with each of `dim` learned kernels (zero padding, divided by the
    number of in-image pixels under the window); the (B, C*dim, h, w) result, channel-major, is read as
    (B, dim, C, h, w) in the same memory, soft-maxed over `dim` and averaged over C, as the published
    weights were trained.
    """

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.basis = nn.Parameter(torch.randn(dim, 1, kernel_size, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        pad = self.kernel_size // 2
        responses = F.conv2d(x.reshape(B * C, 1, h, w), self.basis, padding=pad)  # (B*C, dim, h, w)
        window = torch.ones(1, 1, self.kernel_size, self.kernel_size, dtype=x.dtype, device=x.device)
        counts = F.conv2d(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), window, padding=pad)
        responses = (responses / counts).view(B, self.dim, C, h, w)
        return torch.softmax(responses, dim=1).mean(dim=2)


class RoPE(nn.Module):
    """Rotary position encoding of every pixel of a (B, dim, H, W) map at coordinates in [0, 1]^2."""

    def __init__(self, dim: int, base: float = 100.0):
        super().__init__()
        f = base ** torch.linspace(0, -1, dim // 4)
        f = torch.cat([f, f])
        freqs = torch.zeros(2, dim)
        freqs[0, : dim // 2] = f
        freqs[1, dim // 2 :] = f
        self.freqs = nn.Parameter(2 * torch.pi * freqs)

    def angles(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(dim, H, W) rotation angles y*freqs[0] + x*freqs[1] at (y, x) = (linspace(0,1,H)[i], linspace(0,1,W)[j])."""
        ys = torch.linspace(0, 1, height, device=device, dtype=self.freqs.dtype)
        xs = torch.linspace(0, 1, width, device=device, dtype=self.freqs.dtype)
        fy, fx = self.freqs[0][:, None, None], self.freqs[1][:, None, None]
        return torch.addcmul(fy * ys[None, :, None], fx, xs[None, None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x cos(a) + rot(x) sin(a), rot([x1, x2]) = [-x2, x1] over the channel halves, in three passes."""
        a = self.angles(x.shape[2], x.shape[3], x.device)
        sin = torch.sin(a)
        out = x * torch.cos(a)
        half = x.shape[1] // 2
        out[:, :half].addcmul_(x[:, half:], sin[:half], value=-1)
        out[:, half:].addcmul_(x[:, :half], sin[half:])
        return out


class AttentionProjections(nn.Module):
    """The parameters of a standard multi-head attention of width `dim` (the published layout).

    AnyUp uses only the query and key rows of `in_proj_*`; the value rows and `out_proj` are carried so
    checkpoints load strictly, and play no part in the output.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)


class CrossAttention(nn.Module):
    """RMS-normalised, projected queries and keys, split into heads: (B, heads, H, W, dim // heads)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.norm_q = nn.RMSNorm(dim, eps=None)  # eps: the dtype's machine epsilon
        self.norm_k = nn.RMSNorm(dim, eps=None)
        self.attention = AttentionProjections(dim)

    def _project(self, x: torch.Tensor, norm: nn.RMSNorm, rows: slice) -> torch.Tensor:
        """RMSNorm over channels, then the in_proj rows, on a (B, dim, H, W) map -> (B, heads, H, W, dim/heads).

        Computed as r * (x @ (W diag(g))^T) + b with r = 1/sqrt(mean(x^2) + eps): the norm's scale folded
        into the projection, so the normalised map is never materialised (same result to float rounding).
        """
        B, _, H, W = x.shape
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        weight = self.attention.in_proj_weight[rows] * norm.weight
        inv_rms = x.square().mean(dim=1, keepdim=True).add_(eps).rsqrt_()
        y = F.conv2d(x, weight[:, :, None, None]).mul_(inv_rms).add_(self.attention.in_proj_bias[rows, None, None])
        return y.view(B, self.heads, self.dim // self.heads, H, W).permute(0, 1, 3, 4, 2).contiguous()

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return self._project(q, self.norm_q, slice(0, self.dim))

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        return self._project(k, self.norm_k, slice(self.dim, 2 * self.dim))


class CrossDecode(nn.Module):
    """The query-side 3x3 convolution (zero padding) and the attention that reads the keys."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.cross_attn = CrossAttention(dim, heads)
