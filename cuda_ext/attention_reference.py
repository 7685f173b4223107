"""Pure-PyTorch implementations of the windowed cross-attention.

`window_attention_reference` is the literal dense formula: every query against every key, keys outside the
query's window masked with -inf, softmax, mean over heads, matmul with the values. Obviously right, and the
baseline the fused kernels are tested and benchmarked against (it materialises B*N*Hq*Wq*h*w logits).
`FALLBACK` computes the same thing for one run of query rows with a common row window at a time, with explicit
backward formulas, in memory proportional to one run; it serves as the kernel set on any device where the
compiled kernels are unavailable.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .checks import check_windows


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _inside(bounds: torch.Tensor, extent: int) -> torch.Tensor:
    """(n, extent) bool: position p lies in window [bounds[i, 0], bounds[i, 1])."""
    p = torch.arange(extent, device=bounds.device)
    return (p >= bounds[:, :1]) & (p < bounds[:, 1:])


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                               cols: torch.Tensor) -> torch.Tensor:
    """out[b,c,i,j] = sum_keys mean_n softmax_window(q.k * d**-0.5) v[b,c,key], densely (memory-hungry).

    Differentiable by autograd; 16-bit inputs are computed in float32 and the result cast back.
    """
    B, N, Hq, Wq, d = q.shape
    h, w = k.shape[2:4]
    C = v.shape[1]
    acc = _accumulation_dtype(q.dtype)
    rows, cols = rows.to(q.device), cols.to(q.device)
    logits = torch.matmul(q.to(acc).reshape(B, N, Hq * Wq, d), k.to(acc).reshape(B, N, h * w, d).transpose(-1, -2))
    logits = logits * d**-0.5
    mask = (_inside(rows, h)[:, None, :, None] & _inside(cols, w)[None, :, None, :]).reshape(Hq * Wq, h * w)
    attn = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1).mean(dim=1)  # (B, HqWq, hw)
    out = torch.matmul(v.to(acc).reshape(B, C, h * w), attn.transpose(-1, -2))
    return out.reshape(B, C, Hq, Wq).to(q.dtype)


def _row_runs(rows: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs [i0, i1) of consecutive query rows sharing one row window [y0, y1)."""
    bounds = rows.tolist()
    runs, i0 = [], 0
    for i in range(1, len(bounds) + 1):
        if i == len(bounds) or bounds[i] != bounds[i0]:
            runs.append((i0, i, *bounds[i0]))
            i0 = i
    return runs


def _run_attention(q: torch.Tensor, k: torch.Tensor, colmask: torch.Tensor, run: tuple[int, int, int, int],
                   acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities (B,N,M,K) and head mean (B,M,K) for the M = rows x Wq queries of one run, and the
    queries (B,N,M,d) and keys (B,N,K,d) they used."""
    i0, i1, y0, y1 = run
    B, N, _, Wq, d = q.shape
    w = k.shape[3]
    qr = q[:, :, i0:i1].to(acc).reshape(B, N, (i1 - i0) * Wq, d)
    kr = k[:, :, y0:y1].to(acc).reshape(B, N, (y1 - y0) * w, d)
    mask = colmask[:, None, :].expand(Wq, y1 - y0, w).reshape(1, Wq, -1).repeat(i1 - i0, 1, 1)
    logits = torch.matmul(qr, kr.transpose(-1, -2)) * d**-0.5
    p = logits.masked_fill(~mask.reshape(1, 1, (i1 - i0) * Wq, -1), float("-inf")).softmax(dim=-1)
    return p, p.mean(dim=1), qr, kr


def _checked_runs(q: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """Checks the windows against the query and key grids; (accumulation dtype, mask of in-grid columns)."""
    Hq, Wq = q.shape[2:4]
    h, w = v.shape[2:]
    check_windows("rows", rows, Hq, h, "rows")
    check_windows("cols", cols, Wq, w, "columns")
    return _accumulation_dtype(q.dtype), _inside(cols.to(q.device), w)


def rowwise_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                    cols: torch.Tensor) -> torch.Tensor:
    """The forward one run of query rows at a time (fallback kernel)."""
    B, N, Hq, Wq, d = q.shape
    C = v.shape[1]
    acc, colmask = _checked_runs(q, v, rows, cols)
    out = torch.empty(B, C, Hq, Wq, dtype=q.dtype, device=q.device)
    for run in _row_runs(rows):
        i0, i1, y0, y1 = run
        _, attn, _, _ = _run_attention(q, k, colmask, run, acc)
        vr = v[:, :, y0:y1].to(acc).reshape(B, C, -1)
        out[:, :, i0:i1] = torch.matmul(vr, attn.transpose(-1, -2)).reshape(B, C, i1 - i0, Wq).to(q.dtype)
    return out


def rowwise_backward(grad_output: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rows: torch.Tensor, cols: torch.Tensor, need_q: bool, need_k: bool,
                     need_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k and v one run of query rows at a time, recomputing that run's attention (fallback
    kernel). Unrequested gradients come back as empty tensors."""
    B, N, Hq, Wq, d = q.shape
    C, w = v.shape[1], v.shape[3]
    acc, colmask = _checked_runs(q, v, rows, cols)
    gq = torch.zeros(q.shape, dtype=acc, device=q.device) if need_q else None
    gk = torch.zeros(k.shape, dtype=acc, device=q.device) if need_k else None
    gv = torch.zeros(v.shape, dtype=acc, device=q.device) if need_v else None
    for run in _row_runs(rows):
        i0, i1, y0, y1 = run
        p, attn, qr, kr = _run_attention(q, k, colmask, run, acc)
        g = grad_output[:, :, i0:i1].to(acc).reshape(B, C, -1)  # (B, C, M)
        vr = v[:, :, y0:y1].to(acc).reshape(B, C, -1)  # (B, C, K)
        if need_v:
            gv[:, :, y0:y1] += torch.matmul(g, attn).reshape(B, C, y1 - y0, w)
        if need_q or need_k:
            dp = (torch.matmul(g.transpose(-1, -2), vr) / N).unsqueeze(1)  # (B, 1, M, K): dA / N
            dlogits = p * (dp - (p * dp).sum(dim=-1, keepdim=True)) * d**-0.5
            if need_q:
                gq[:, :, i0:i1] = torch.matmul(dlogits, kr).reshape(B, N, i1 - i0, Wq, d)
            if need_k:
                gk[:, :, y0:y1] += torch.matmul(dlogits.transpose(-1, -2), qr).reshape(B, N, y1 - y0, w, d)
    empty = q.new_empty(0)
    return tuple(t.to(q.dtype) if t is not None else empty for t in (gq, gk, gv))


FALLBACK = SimpleNamespace(forward=rowwise_forward, backward=rowwise_backward,
                           __name__="pure-PyTorch row-run kernels")
