"""The upsamplers' hot loops as PyTorch operators with fused C++ (CPU) and CUDA kernels.

    adaptive_conv     out[b,c,h,w] = sum_{i,j} filters[b,h,w,i,j] * input[b,c,h+i,w+j]        (FeatUp's JBU)
    window_attention  out[b,c,i,j] = sum_{(y,x) in window(i,j)} A[b,i,j,y,x] * v[b,c,y,x]    (AnyUp)
                      A = mean over heads of softmax over the window of q.k / sqrt(d)

Each family's kernels are built just in time on first use (`python -m cuda_ext.build` builds all ahead of
time); importing this package never builds anything and never fails because a build failed: the family then
runs its pure-PyTorch kernels, with one warning (see `cuda_ext.ops`). `adaptive_conv_reference` and
`window_attention_reference` are the literal (memory-hungry) formulas, kept for tests and benchmarks;
`anyup_windows` computes AnyUp's key windows.
"""

from __future__ import annotations

import torch

from . import ops
from .checks import check_pair, check_tensor
from .attention import anyup_windows, window_attention
from .attention_reference import window_attention_reference
from .reference import adaptive_conv_reference, local_dot_reference

__all__ = ["adaptive_conv", "adaptive_conv_reference", "local_dot", "local_dot_reference", "window_attention",
           "window_attention_reference", "anyup_windows", "implementation"]


def adaptive_conv(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Per-pixel k x k filtering: input (B,C,H+k-1,W+k-1) padded, filters (B,H,W,k,k) -> (B,C,H,W).

    Differentiable in both arguments; float16/bfloat16 accumulate in float32.
    """
    check_tensor("input", input, 4, "(B, C, H+k-1, W+k-1)")
    check_tensor("filters", filters, 5, "(B, H, W, k, k)")
    check_pair("input", input, "filters", filters)
    k = filters.shape[3]
    if filters.shape[4] != k:
        raise ValueError(f"filters must be square k x k taps, got {tuple(filters.shape[3:])}")
    if k % 2 == 0:
        raise ValueError(f"the filter size must be odd (a centred window), got k={k}")
    H, W = filters.shape[1:3]
    if tuple(input.shape[2:]) != (H + k - 1, W + k - 1):
        raise ValueError(
            f"input spatial size {tuple(input.shape[2:])} must be the output size plus k-1 = "
            f"{(H + k - 1, W + k - 1)} for filters {tuple(filters.shape)}: pad the input by k//2 = {k // 2}"
        )
    return torch.ops.featup.adaptive_conv(input, filters)


def local_dot(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Dot products with the k x k neighbourhood: query (B,C,H,W), keys (B,C,H+k-1,W+k-1) padded
    -> (B,H,W,k,k) with out[b,h,w,i,j] = sum_c query[b,c,h,w] * keys[b,c,h+i,w+j].

    The same contraction as the adaptive conv's filter gradient, so it runs on the same fused kernels
    (the JBU range kernel uses it instead of unfolding the keys).
    """
    check_tensor("query", query, 4, "(B, C, H, W)")
    check_tensor("keys", keys, 4, "(B, C, H+k-1, W+k-1)")
    check_pair("query", query, "keys", keys)
    kh, kw = keys.shape[2] - query.shape[2] + 1, keys.shape[3] - query.shape[3] + 1
    if query.shape[1] != keys.shape[1] or kh != kw or kh < 1 or kh % 2 == 0:
        raise ValueError(
            f"keys {tuple(keys.shape)} must be query {tuple(query.shape)} padded by the same odd window on both axes"
        )
    return torch.ops.featup.adaptive_conv_grad_filters(query, keys)


def implementation(device_type: str = "cpu", family: str = "adaptive_conv") -> str:
    """'compiled' when the fused kernels of `family` ("adaptive_conv" or "window_attention") serve this device
    type, else why the fallback is used."""
    return ops.implementation(device_type, family)
