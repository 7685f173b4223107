"""AnyUp: one image-guided upsampler for the features of any backbone (Wimmer et al., "AnyUp: Universal
Feature Upsampling", ICLR 2026), bit-compatible with the published checkpoints.

    up = featup_ops.load_anyup(featup_ops.ANYUP_MULTI_BACKBONE_URL)
    highres = up(image, features)           # image ImageNet-normalised (B,3,H,W), features (B,C,h,w), any C

Every output pixel is a convex combination of the input feature vectors inside a window of the low-res
grid (about a fifth of it per axis), weighted by windowed cross-attention between image-derived queries
and image+feature-derived keys. `attention="fused"` runs it on `cuda_ext.window_attention` (only the
window is ever computed); `attention="dense"` is the reference: dense attention over all keys, masked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import cuda_ext

from .anyup_inference import Workspace, encoder_into, project_heads, rope_into, unify_features
from .anyup_layers import CrossDecode, FeatureUnification, ResBlock, RoPE, encoder

QK_DIM = 128
HEADS = 4
WINDOW_RATIO = 0.1
UNIFICATION_KERNEL = 5
ATTENTION_KINDS = ("fused", "dense")


def window_bounds(n_queries: int, n_keys: int, ratio: float = WINDOW_RATIO) -> torch.Tensor:
    """(n_queries, 2) int64 [start, end) key rows (or columns) each query row sees, computed in float32.

    The order of operations is part of the definition: ties at exact integers depend on it.
    """
    r = (torch.arange(n_queries, dtype=torch.float32) + 0.5) / n_queries
    start = torch.floor(torch.clamp(r - ratio, 0, 1) * n_keys)
    end = torch.ceil(torch.clamp(r + ratio, 0, 1) * n_keys)
    return torch.stack([start, end], dim=1).long()


def dense_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                           cols: torch.Tensor, q_chunk_size: int | None = None) -> torch.Tensor:
    """The reference: head-averaged softmax over all keys with those outside each query's window masked.

    q (B, N, Hq, Wq, d), k (B, N, h, w, d), v (B, C, h, w), rows (Hq, 2) / cols (Wq, 2) [start, end)
    -> (B, C, Hq, Wq). `q_chunk_size` queries (flattened, row-major) at a time bound the (B, N, chunk, h*w)
    attention tensor; the result does not depend on it (beyond float rounding of differently blocked products).
    """
    B, N, Hq, Wq, d = q.shape
    h, w = k.shape[2:4]
    C = v.shape[1]
    queries = q.reshape(B, N, Hq * Wq, d)
    keys = k.reshape(B, N, h * w, d)
    values = v.reshape(B, C, h * w).transpose(1, 2)  # (B, h*w, C)
    rows, cols = rows.to(q.device), cols.to(q.device)
    key_y = torch.arange(h, device=q.device)
    key_x = torch.arange(w, device=q.device)
    chunk = Hq * Wq if q_chunk_size is None else int(q_chunk_size)
    out = []
    for start in range(0, Hq * Wq, chunk):
        idx = torch.arange(start, min(start + chunk, Hq * Wq), device=q.device)
        r, c = rows[idx // Wq], cols[idx % Wq]
        in_rows = (key_y >= r[:, :1]) & (key_y < r[:, 1:])  # (n, h)
        in_cols = (key_x >= c[:, :1]) & (key_x < c[:, 1:])  # (n, w)
        mask = (in_rows[:, :, None] & in_cols[:, None, :]).reshape(len(idx), h * w)
        logits = queries[:, :, idx] @ keys.transpose(-1, -2) * d**-0.5  # (B, N, n, h*w)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).mean(dim=1)  # (B, n, h*w)
        out.append(weights @ values)
    return torch.cat(out, dim=1).transpose(1, 2).reshape(B, C, Hq, Wq)


def fused_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                           cols: torch.Tensor) -> torch.Tensor:
    """The same result on `cuda_ext.window_attention`, which computes the window only."""
    return cuda_ext.window_attention(q, k, v, rows.to(q.device), cols.to(q.device))


def _size(value: Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    size = tuple(int(s) for s in value)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be two positive integers (height, width), got {value!r}")
    return size  # type: ignore[return-value]


class AnyUp(nn.Module):
    """up(image, features, output_size=None, q_chunk_size=None) -> (B, C, H', W') features.

    `image` (B,3,H,W) ImageNet-normalised, `features` (B,C,h,w) with any C; the output size defaults to the
    image's. Computes in the parameters' dtype (float32) whatever autocast is active, and returns the
    features' dtype. `q_chunk_size` bounds the dense path's memory and never changes the result (to float rounding).
    """

    def __init__(self, attention: str = "fused", dim: int = QK_DIM, heads: int = HEADS,
                 window_ratio: float = WINDOW_RATIO, unification_kernel: int = UNIFICATION_KERNEL):
        super().__init__()
        self.dim, self.heads, self.window_ratio = dim, heads, window_ratio
        self.unification_kernel = unification_kernel
        self.attention = attention
        self.weights_id: str | None = None  # set by load_anyup: a fingerprint of the weights loaded
        self.weights_source: str | None = None  # set by load_anyup: the path or URL they came from
        self.image_encoder = encoder(3, dim)
        self.key_encoder = encoder(dim, dim)
        self.query_encoder = encoder(dim, dim)
        self.key_features_encoder = nn.Sequential(FeatureUnification(dim, unification_kernel),
                                                  ResBlock(dim, dim), ResBlock(dim, dim))
        self.cross_decode = CrossDecode(dim, heads)
        self.aggregation = encoder(2 * dim, dim, kernel_size=3)
        self.rope = RoPE(dim)

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, kind: str) -> None:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
        if kind == "fused" and not hasattr(cuda_ext, "window_attention"):
            raise ValueError("attention='fused' needs cuda_ext.window_attention, which this installation lacks; "
                             "use attention='dense'")
        self._attention = kind

    def config(self) -> dict:
        return {"kind": "anyup", "qk_dim": self.dim, "heads": self.heads, "window_ratio": self.window_ratio,
                "unification_kernel": self.unification_kernel, "attention": self.attention}

    def _check(self, image: torch.Tensor, features: torch.Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be ImageNet-normalised RGB (B,3,H,W), got {tuple(image.shape)}")
        if features.dim() != 4:
            raise ValueError(f"features must be (B,C,h,w), got {tuple(features.shape)}")
        if image.shape[0] != features.shape[0]:
            raise ValueError(f"image batch {image.shape[0]} != features batch {features.shape[0]}")
        if min(features.shape[2:]) < 2:
            raise ValueError(f"features need a grid of at least 2 x 2 (the key aggregation pads by reflection), "
                             f"got {tuple(features.shape[2:])}")
        if not (image.is_floating_point() and features.is_floating_point()):
            raise TypeError(f"image and features must be floating point, got {image.dtype} and {features.dtype}")

    def embed(self, image: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
        """(B, d, H, W) pixel embeddings: the image encoder, then RoPE."""
        if ws is None:
            return self.rope(self.image_encoder(image))
        x = encoder_into(self.image_encoder, image, ws)
        e = rope_into(self.rope, x, ws)
        ws.give(x)
        return e

    def queries(self, e: torch.Tensor, size: tuple[int, int], ws: Workspace | None = None) -> torch.Tensor:
        """(B, heads, H', W', d/heads) queries from the pixel embeddings, on the output grid."""
        pool_to = None if tuple(e.shape[2:]) == tuple(size) else size
        if ws is None:
            q = self.query_encoder(e)
            q = q if pool_to is None else F.adaptive_avg_pool2d(q, size)
        else:
            q = encoder_into(self.query_encoder, e, ws, pool_to)
        decoded = self.cross_decode.conv2d(q)
        if ws is None:
            return self.cross_decode.cross_attn.queries(decoded)
        scratch = q if q.shape == ws.shape else None
        out = project_heads(self.cross_decode.cross_attn, decoded, "queries", scratch)
        if scratch is not None:
            ws.give(scratch)
        return out

    def keys(self, e: torch.Tensor, features: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
        """(B, heads, h, w, d/heads) keys from the pixel embeddings pooled to the grid and the features."""
        grid = tuple(features.shape[2:])
        if ws is None:
            pooled = F.adaptive_avg_pool2d(self.key_encoder(e), grid)
        else:
            pooled = encoder_into(self.key_encoder, e, ws, grid)
        unification, *blocks = self.key_features_encoder
        f = F.normalize(features, dim=1)
        f = unification(f) if ws is None else unify_features(unification, f)
        for block in blocks:
            f = block(f)
        k = self.aggregation(torch.cat([pooled, f], dim=1))
        if ws is None:
            return self.cross_decode.cross_attn.keys(k)
        return project_heads(self.cross_decode.cross_attn, k, "keys")

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Sequence[int] | None = None,
                q_chunk_size: int | None = None) -> torch.Tensor:
        self._check(image, features)
        size = _size(output_size, tuple(image.shape[2:]))
        if q_chunk_size is not None and int(q_chunk_size) < 1:
            raise ValueError(f"q_chunk_size must be a positive number of queries, got {q_chunk_size}")
        dtype = self.rope.freqs.dtype
        no_autocast = (torch.autocast(image.device.type, enabled=False)
                       if torch.is_autocast_enabled(image.device.type) else contextlib.nullcontext())
        with no_autocast:
            # Contiguous NCHW on purpose: channels-last is a little faster on CPU, but its GroupNorm loses
            # precision on full-resolution maps (~5e-5 relative), more than the parity budget allows.
            image = image.to(dtype).contiguous()
            values = features.to(dtype)
            ws = None
            if not torch.is_grad_enabled():  # inference: reuse full-resolution buffers (anyup_inference)
                ws = Workspace((image.shape[0], self.dim, *image.shape[2:]), dtype, image.device)
            e = self.embed(image, ws)
            q = self.queries(e, size, ws)
            k = self.keys(e, values, ws)
            del e, ws
            rows = window_bounds(size[0], values.shape[2], self.window_ratio)
            cols = window_bounds(size[1], values.shape[3], self.window_ratio)
            if self.attention == "fused":
                out = fused_window_attention(q, k, values, rows, cols)
            else:
                out = dense_window_attention(q, k, values, rows, cols, q_chunk_size)
        return out.to(features.dtype)


class AnyUpUpsampler(nn.Module):
    """AnyUp behind the upsampler registry's call `up(features, guidance)`, output at the guidance's size
    (times `output_scale`, rounded, for outputs smaller than the image)."""

    def __init__(self, anyup: AnyUp, q_chunk_size: int | None = None, output_scale: float = 1.0):
        super().__init__()
        self.anyup = anyup
        self.q_chunk_size = q_chunk_size
        self.output_scale = float(output_scale)

    @property
    def weights_id(self) -> str | None:
        return self.anyup.weights_id

    @property
    def weights_source(self) -> str | None:
        return self.anyup.weights_source

    def config(self) -> dict:
        size = "image" if self.output_scale == 1 else f"image x {self.output_scale:g}"
        return {**self.anyup.config(), "output_size": size}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output follows the image (times `output_scale`), whatever the backbone's grid."""
        s = self.output_scale
        return max(1, round(height * s)), max(1, round(width * s))

    def forward(self, features: torch.Tensor, guidance: torch.Tensor,
                output_size: Sequence[int] | None = None) -> torch.Tensor:
        if output_size is None and self.output_scale != 1:
            output_size = self.output_size(*guidance.shape[2:])
        return self.anyup(guidance, features, output_size=output_size, q_chunk_size=self.q_chunk_size)
