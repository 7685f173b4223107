"""The adaptive convolution at the heart of FeatUp's JBU, as a PyTorch operator.

    out[b,c,h,w] = sum_{i,j} filters[b,h,w,i,j] * input[b,c,h+i,w+j]

`adaptive_conv` runs fused C++ (CPU) or CUDA kernels, built just in time on first use; importing this
package never builds anything and never fails because a build failed (see `cuda_ext.ops`).
`adaptive_conv_reference` is the literal unfold formula, kept for tests and benchmarks.
"""

from __future__ import annotations

import torch

from . import ops
from .reference import adaptive_conv_reference, local_dot_reference

__all__ = ["adaptive_conv", "adaptive_conv_reference", "local_dot", "local_dot_reference", "implementation"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must share a dtype, got {a.dtype} and {b.dtype}; cast one of them")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on one device, got {a.device} and {b.device}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a_name} {tuple(a.shape)} vs {b_name} {tuple(b.shape)}")


def adaptive_conv(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Per-pixel k x k filtering: input (B,C,H+k-1,W+k-1) padded, filters (B,H,W,k,k) -> (B,C,H,W).

    Differentiable in both arguments; float16/bfloat16 accumulate in float32.
    """
    _check_tensor("input", input, 4, "(B, C, H+k-1, W+k-1)")
    _check_tensor("filters", filters, 5, "(B, H, W, k, k)")
    _check_pair("input", input, "filters", filters)
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
    _check_tensor("query", query, 4, "(B, C, H, W)")
    _check_tensor("keys", keys, 4, "(B, C, H+k-1, W+k-1)")
    _check_pair("query", query, "keys", keys)
    kh, kw = keys.shape[2] - query.shape[2] + 1, keys.shape[3] - query.shape[3] + 1
    if query.shape[1] != keys.shape[1] or kh != kw or kh < 1 or kh % 2 == 0:
        raise ValueError(
            f"keys {tuple(keys.shape)} must be query {tuple(query.shape)} padded by the same odd window on both axes"
        )
    return torch.ops.featup.adaptive_conv_grad_filters(query, keys)


def implementation(device_type: str = "cpu") -> str:
    """'compiled' when the fused kernels serve this device type, else why the fallback is used."""
    return ops.implementation(device_type)
