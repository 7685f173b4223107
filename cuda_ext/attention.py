"""Windowed cross-attention: the checked public entry point and AnyUp's window rule.

Each query (i, j) of a Hq x Wq grid attends to the keys of an h x w grid inside its window
[rows[i, 0], rows[i, 1]) x [cols[j, 0], cols[j, 1]); see `cuda_ext.attention_ops` for the operator.
"""

from __future__ import annotations

import torch

from . import attention_ops  # noqa: F401 - registers featup::window_attention
from .checks import check_pair, check_tensor, check_windows


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> torch.Tensor:
    """out[b,c,i,j] = sum over the window of (i, j) of A[b,i,j,y,x] v[b,c,y,x], with A the mean over heads of the
    softmax over the window of q[b,n,i,j] . k[b,n,y,x] / sqrt(d).

    q (B, N, Hq, Wq, d), k (B, N, h, w, d), v (B, C, h, w) -> (B, C, Hq, Wq); rows (Hq, 2) and cols (Wq, 2) int64
    [start, end) windows on the CPU or q's device. Differentiable in q, k and v; 16-bit inputs accumulate in float32.
    """
    check_tensor("q", q, 5, "(B, N, Hq, Wq, d)")
    check_tensor("k", k, 5, "(B, N, h, w, d)")
    check_tensor("v", v, 4, "(B, C, h, w)")
    check_pair("q", q, "k", k)
    check_pair("k", k, "v", v)
    if k.shape[1] != q.shape[1] or k.shape[4] != q.shape[4]:
        raise ValueError(f"k {tuple(k.shape)} must have the heads and head width of q {tuple(q.shape)}: "
                         "(B, N, h, w, d) against (B, N, Hq, Wq, d)")
    if tuple(v.shape[2:]) != tuple(k.shape[2:4]):
        raise ValueError(f"v {tuple(v.shape)} must lie on the key grid of k {tuple(k.shape)}: "
                         f"expected (B, C, {k.shape[2]}, {k.shape[3]})")
    for name, t in (("rows", rows), ("cols", cols)):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu" and t.device != q.device:
            raise ValueError(f"{name} must be on the CPU or on q's device {q.device}, got {t.device}")
    if not torch.compiler.is_compiling():  # values are data: the kernels check them again at run time
        check_windows("rows", rows, q.shape[2], k.shape[2], "rows")
        check_windows("cols", cols, q.shape[3], k.shape[3], "columns")
    return torch.ops.featup.window_attention(q, k, v, rows, cols)


def _axis_windows(n_out: int, n_in: int, ratio: torch.Tensor) -> torch.Tensor:
    r = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out
    start = torch.floor((r - ratio).clamp(0, 1) * n_in)
    end = torch.ceil((r + ratio).clamp(0, 1) * n_in)
    return torch.stack([start, end], dim=1).to(torch.int64)


def anyup_windows(Hq: int, Wq: int, h: int, w: int, ratio: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """AnyUp's key windows (Wimmer et al., ICLR 2026) for a Hq x Wq query grid over an h x w key grid.

    Per axis, in float32 and in this order (ties at exact integers depend on it): r = (arange(n) + 0.5) / n,
    start = floor(clamp(r - ratio, 0, 1) * keys), end = ceil(clamp(r + ratio, 0, 1) * keys).
    Returns (rows (Hq, 2), cols (Wq, 2)) int64 CPU tensors of [start, end).
    """
    for name, value in (("Hq", Hq), ("Wq", Wq), ("h", h), ("w", w)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1] (AnyUp uses 0.1), got {ratio!r}")
    r = torch.tensor(ratio, dtype=torch.float32)
    return _axis_windows(Hq, h, r), _axis_windows(Wq, w, r)
