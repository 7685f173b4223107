"""Argument checks shared by the operators' public entry points: clear errors naming the offending value."""

from __future__ import annotations

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    """t is a floating tensor of the given rank, else TypeError/ValueError naming name and layout."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Same dtype, device and batch size."""
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must share a dtype, got {a.dtype} and {b.dtype}; cast one of them")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on one device, got {a.device} and {b.device}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a_name} {tuple(a.shape)} vs {b_name} {tuple(b.shape)}")


def check_windows(name: str, bounds: torch.Tensor, count: int, extent: int, axis: str) -> None:
    """bounds is an int64 (count, 2) tensor of non-empty [start, end) ranges inside [0, extent)."""
    if not isinstance(bounds, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({count}, 2), got {type(bounds).__name__}")
    if bounds.dtype != torch.int64 or tuple(bounds.shape) != (count, 2):
        raise ValueError(f"{name} must be an int64 tensor of shape ({count}, 2) (one [start, end) range of key "
                         f"{axis} per query {axis[:-1]}), got {bounds.dtype} {tuple(bounds.shape)}")
    b = bounds.detach().cpu()
    bad = ((b[:, 0] < 0) | (b[:, 0] >= b[:, 1]) | (b[:, 1] > extent)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = [{int(b[i, 0])}, {int(b[i, 1])}) is not a non-empty range of key {axis} "
                         f"inside [0, {extent}); compute the windows for this key grid (e.g. cuda_ext.anyup_windows)")
