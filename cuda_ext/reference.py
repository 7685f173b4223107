"""Pure-PyTorch implementations of the adaptive convolution.

`adaptive_conv_reference` is the literal unfold formula: obviously right, and the baseline the fused
kernels are tested and benchmarked against (it materialises B*C*k*k*H*W values). The `shifted_*`
functions compute the same thing one tap at a time with O(output) extra memory; they serve as the
fallback kernels on any device when a compiled kernel is unavailable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_conv_reference(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """out[b,c,h,w] = sum_ij filters[b,h,w,i,j] * input[b,c,h+i,w+j], via unfold (memory-hungry)."""
    B, C = input.shape[:2]
    _, H, W, k, _ = filters.shape
    cols = F.unfold(input, kernel_size=k).view(B, C, k * k, H, W)
    taps = filters.reshape(B, H, W, k * k).permute(0, 3, 1, 2).unsqueeze(1)  # (B,1,k*k,H,W)
    return (cols * taps).sum(dim=2)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def shifted_forward(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Forward, one shifted multiply-add per tap, accumulating in float32 for 16-bit inputs."""
    B, C = input.shape[:2]
    _, H, W, k, _ = filters.shape
    acc = _accumulation_dtype(input.dtype)
    out = torch.zeros(B, C, H, W, dtype=acc, device=input.device)
    taps = filters.to(acc)
    for i in range(k):
        for j in range(k):
            out.addcmul_(input[:, :, i : i + H, j : j + W].to(acc), taps[:, None, :, :, i, j])
    return out.to(input.dtype)


def shifted_grad_input(grad_output: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """d out / d input contracted with grad_output: scatter each tap's product back to its shift."""
    B, C, H, W = grad_output.shape
    k = filters.shape[-1]
    acc = _accumulation_dtype(grad_output.dtype)
    g = grad_output.to(acc)
    taps = filters.to(acc)
    grad = torch.zeros(B, C, H + k - 1, W + k - 1, dtype=acc, device=grad_output.device)
    for i in range(k):
        for j in range(k):
            grad[:, :, i : i + H, j : j + W].addcmul_(g, taps[:, None, :, :, i, j])
    return grad.to(grad_output.dtype)


def shifted_grad_filters(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """d out / d filters contracted with grad_output: per tap, a channel reduction."""
    B, C, H, W = grad_output.shape
    k = input.shape[2] - H + 1
    acc = _accumulation_dtype(grad_output.dtype)
    g = grad_output.to(acc)
    grad = torch.empty(B, H, W, k, k, dtype=acc, device=grad_output.device)
    for i in range(k):
        for j in range(k):
            grad[..., i, j] = (g * input[:, :, i : i + H, j : j + W].to(acc)).sum(dim=1)
    return grad.to(grad_output.dtype)


def local_dot_reference(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """out[b,h,w,i,j] = sum_c query[b,c,h,w] * keys[b,c,h+i,w+j], via unfold (memory-hungry)."""
    B, C, H, W = query.shape
    k = keys.shape[2] - H + 1
    cols = F.unfold(keys, kernel_size=k).view(B, C, k * k, H, W)
    return (cols * query.unsqueeze(2)).sum(dim=1).permute(0, 2, 3, 1).reshape(B, H, W, k, k)
