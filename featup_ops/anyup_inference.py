"""Allocation-light inference for AnyUp's full-resolution encoders (no autograd).

AnyUp runs three 128-channel encoders at the image's full resolution: at 448 px every intermediate map is
100 MB. On CPU, writing a freshly allocated map of that size page-faults about as long as the 1x1
convolution that fills it takes, and the plain module path makes some thirty of them per call. Here the
same layers (same parameters, same formulas to float rounding) write into a handful of reused buffers,
1x1 convolutions are plain GEMMs, and the feature unification and q/k projections skip intermediates.
Training and any call with gradients enabled use the modules themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .anyup_layers import CrossAttention, FeatureUnification, ResBlock, RoPE


class Workspace:
    """Reusable (B, C, H, W) scratch maps for one inference pass; at most `max_free` are kept unused (more
    would only hold memory: the passes below never need more at once)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, max_free: int = 3):
        self.shape, self.dtype, self.device, self.max_free = tuple(shape), dtype, device, max_free
        self._free: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        return self._free.pop() if self._free else torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def give(self, *maps: torch.Tensor) -> None:
        self._free.extend(maps[: max(self.max_free - len(self._free), 0)])


def conv1x1_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 convolution of contiguous NCHW `x` written into `out` (one GEMM per image)."""
    B, C, H, W = x.shape
    w = weight.reshape(weight.shape[0], C)
    for b in range(B):
        torch.mm(w, x[b].view(C, H * W), out=out[b].view(-1, H * W))
    return out


def group_norm_into(x: torch.Tensor, norm: nn.GroupNorm, out: torch.Tensor) -> torch.Tensor:
    """GroupNorm of `x` written into `out` (which may be `x`): centre, then the variance of the centred
    values (two-pass statistics, as accurate as the module's), then scale and shift in place."""
    B, C = x.shape[:2]
    G = norm.num_groups
    groups, centred = x.view(B, G, -1), out.view(B, G, -1)
    mean = groups.mean(dim=2, keepdim=True)
    torch.sub(groups, mean, out=centred)
    var = torch.linalg.vector_norm(centred, dim=2, keepdim=True).square_().div_(centred.shape[2])
    scale = norm.weight.view(1, G, C // G) * (var + norm.eps).rsqrt()  # (B, G, C/G)
    out.mul_(scale.reshape(B, C, 1, 1)).add_(norm.bias.view(1, C, 1, 1))
    return out


# glibc serves blocks up to 32 MiB from its heap and reuses them; larger ones are mapped fresh from the OS
# and page-fault when first written. Below this size a fresh map costs nothing extra.
HEAP_SERVED_BYTES = 32 * 2**20


def group_norm_ws(x: torch.Tensor, norm: nn.GroupNorm, ws: Workspace, reuse_input: bool = False) -> torch.Tensor:
    """GroupNorm of `x` as a workspace map: the module's own (faster) kernel where a fresh map is cheap,
    else written into a reused buffer (`x` itself with `reuse_input`, which hands `x` over either way)."""
    if x.numel() * x.element_size() <= HEAP_SERVED_BYTES:
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        if reuse_input:
            ws.give(x)
        return y
    return group_norm_into(x, norm, x if reuse_input else ws.take())


def _plain_1x1(block: ResBlock) -> bool:
    conv = block.block[2]
    return conv.kernel_size == (1, 1) and isinstance(block.shortcut, nn.Identity)


def resblock_into(block: ResBlock, x: torch.Tensor, ws: Workspace,
                  pool_to: tuple[int, int] | None = None) -> torch.Tensor:
    """block(x) in workspace buffers; `x` is left intact (the caller gives it back when done).

    With `pool_to`, returns adaptive_avg_pool(block(x), pool_to) computed as conv(pool(b)) + pool(x): the
    pooling is linear and the last 1x1 convolution acts per pixel, so it runs on the pooled grid.
    """
    if not _plain_1x1(block):
        out = block(x)
        return out if pool_to is None else F.adaptive_avg_pool2d(out, pool_to)
    norm1, _, conv1, norm2, _, conv2 = block.block
    a = F.silu(group_norm_ws(x, norm1, ws), inplace=True)
    b = conv1x1_into(a, conv1.weight, ws.take())
    b = F.silu(group_norm_ws(b, norm2, ws, reuse_input=True), inplace=True)
    if pool_to is not None:
        ws.give(a, b)
        return F.conv2d(F.adaptive_avg_pool2d(b, pool_to), conv2.weight).add_(F.adaptive_avg_pool2d(x, pool_to))
    out = conv1x1_into(b, conv2.weight, a).add_(x)
    ws.give(b)
    return out


def encoder_into(encoder: nn.Sequential, x: torch.Tensor, ws: Workspace,
                 pool_to: tuple[int, int] | None = None) -> torch.Tensor:
    """A 1x1 `encoder(in, d)` (conv, then residual blocks) in workspace buffers, its output average-pooled
    to `pool_to` when given; `x` is left intact."""
    conv, *blocks = encoder
    y = conv1x1_into(x, conv.weight, ws.take())
    for n, block in enumerate(blocks):
        out = resblock_into(block, y, ws, pool_to if n == len(blocks) - 1 else None)
        ws.give(y)
        y = out
    return y


def unify_features(unification: FeatureUnification, x: torch.Tensor) -> torch.Tensor:
    """unification(x) as one GEMM per image over the unfolded 5x5 patches (a 1-channel convolution runs
    far below GEMM speed), with the border division fused into the transpose and an in-place softmax."""
    B, C, h, w = x.shape
    d, k = unification.dim, unification.kernel_size
    basis = unification.basis.view(d, k * k)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    counts = F.conv2d(ones, torch.ones(1, 1, k, k, dtype=x.dtype, device=x.device), padding=k // 2).view(1, 1, h * w)
    out = []
    for b in range(B):
        patches = F.unfold(x[b].reshape(C, 1, h, w), k, padding=k // 2)  # (C, k*k, hw)
        prod = torch.mm(basis, patches.transpose(0, 1).reshape(k * k, C * h * w)).view(d, C, h * w)  # (k, c, p)
        responses = torch.empty(C, d, h * w, dtype=x.dtype, device=x.device)  # (c, k, p): the channel-major order
        torch.div(prod.transpose(0, 1), counts, out=responses)
        del prod
        mixed = responses.view(d, C, h * w)  # the published (d, C) reading of the same memory
        mixed.sub_(mixed.amax(dim=0, keepdim=True)).exp_()
        mixed.div_(mixed.sum(dim=0, keepdim=True))
        out.append(mixed.mean(dim=1).view(d, h, w))
    return torch.stack(out)


def rope_into(rope: RoPE, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """RoPE(x) in workspace buffers; `x` is left intact."""
    angles, sines, out = ws.take(), ws.take(), ws.take()
    a = angles[0]
    ys = torch.linspace(0, 1, x.shape[2], device=x.device, dtype=x.dtype)
    xs = torch.linspace(0, 1, x.shape[3], device=x.device, dtype=x.dtype)
    torch.addcmul(rope.freqs[0][:, None, None] * ys[None, :, None], rope.freqs[1][:, None, None],
                  xs[None, None, :], out=a)
    sin = torch.sin(a, out=sines[0])
    torch.mul(x, a.cos_(), out=out)
    half = x.shape[1] // 2
    out[:, :half].addcmul_(x[:, half:], sin[:half], value=-1)
    out[:, half:].addcmul_(x[:, :half], sin[half:])
    ws.give(angles, sines)
    return out


def project_heads(attn: CrossAttention, x: torch.Tensor, kind: str,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """attn.queries(x) / attn.keys(x) without intermediate maps: (B, heads, H, W, dim/heads).

    `scratch`, a buffer shaped like `x`, holds the squares for the RMS statistics when given.
    """
    norm = attn.norm_q if kind == "queries" else attn.norm_k
    rows = slice(0, attn.dim) if kind == "queries" else slice(attn.dim, 2 * attn.dim)
    B, C, H, W = x.shape
    heads, width = attn.heads, attn.dim // attn.heads
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    weight = (attn.attention.in_proj_weight[rows] * norm.weight).view(heads, width, C)
    bias = attn.attention.in_proj_bias[rows].view(heads, 1, width)
    squares = torch.mul(x, x, out=scratch) if scratch is not None else x * x
    inv_rms = squares.sum(dim=1).div_(C).add_(eps).rsqrt_().view(B, 1, H * W, 1)
    out = torch.empty(B, heads, H * W, width, dtype=x.dtype, device=x.device)
    for b in range(B):
        pixels = x[b].view(C, H * W).t()  # (HW, C), a transposed view: the GEMM reads it as is
        for n in range(heads):
            torch.mm(pixels, weight[n].t(), out=out[b, n])
    out.mul_(inv_rms).add_(bias)
    return out.view(B, heads, H, W, width)
