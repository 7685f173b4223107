"""The adaptive convolution as PyTorch operators in the `featup` namespace, and the per-family kernel chooser
(compiled extension or pure-PyTorch fallback) that every operator family shares.

Three ops close under differentiation, so autograd (to any order) and torch.compile work through them:

    featup::adaptive_conv(input, filters)                 Y[b,c,h,w]   = sum_ij K[b,h,w,i,j] X[b,c,h+i,w+j]
    featup::adaptive_conv_grad_input(grad_out, filters)   dX[b,c,y,x]  = sum_ij G[b,c,y-i,x-j] K[b,y-i,x-j,i,j]
    featup::adaptive_conv_grad_filters(grad_out, input)   dK[b,h,w,i,j]= sum_c G[b,c,h,w] X[b,c,h+i,w+j]

CPU and CUDA kernels are the compiled extensions when they build, else the pure-PyTorch shifted
kernels (with a one-time warning naming the reason). Fake kernels give shapes for tracing.
"""

from __future__ import annotations

import logging
import threading
import warnings
from types import SimpleNamespace

import torch

from . import reference

log = logging.getLogger(__name__)

_lib = torch.library.Library("featup", "DEF")
_lib.define("adaptive_conv(Tensor input, Tensor filters) -> Tensor")
_lib.define("adaptive_conv_grad_input(Tensor grad_output, Tensor filters) -> Tensor")
_lib.define("adaptive_conv_grad_filters(Tensor grad_output, Tensor input) -> Tensor")

FALLBACK = SimpleNamespace(
    forward=reference.shifted_forward,
    grad_input=reference.shifted_grad_input,
    grad_filters=reference.shifted_grad_filters,
    __name__="pure-PyTorch shifted kernels",
)

# Each operator family's pure-PyTorch kernels, used where its compiled kernels are unavailable.
_FALLBACKS: dict[str, object] = {"adaptive_conv": FALLBACK}
_chosen: dict[tuple[str, str], tuple[object, str]] = {}
_choose_lock = threading.Lock()


def register_fallback(family: str, kernels: object) -> None:
    """Names the pure-PyTorch kernel set of an operator family (same attribute names as its extension)."""
    _FALLBACKS[family] = kernels


def kernels_for(device_type: str, dtype: torch.dtype = torch.float32, family: str = "adaptive_conv"):
    """The kernel set of `family` used for tensors of this device type and dtype (builds on first call)."""
    fallback = _FALLBACKS[family]
    if device_type == "cuda" and dtype == torch.float64:
        return fallback  # the CUDA kernels accumulate in float32; keep double precision exact
    if device_type not in ("cpu", "cuda"):
        return fallback
    with _choose_lock:
        key = (family, device_type)
        if key not in _chosen:
            from . import build  # imported lazily: importing the package must stay build-free

            result = build.load(family, device_type)
            if result.module is not None:
                _chosen[key] = (result.module, "compiled")
                log.info("featup %s: using compiled %s kernels", family, device_type)
            else:
                _chosen[key] = (fallback, result.reason)
                warnings.warn(
                    f"featup {family}: the compiled {device_type} kernel is unavailable ({result.reason}); "
                    "using the pure-PyTorch fallback (same results, slower). "
                    "Run `python -m cuda_ext.build` to see the build log.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _chosen[key][0]


def implementation(device_type: str, family: str = "adaptive_conv") -> str:
    """'compiled' or the reason the fallback is used for this family and device type (triggers the build)."""
    kernels_for(device_type, family=family)
    return _chosen.get((family, device_type), (None, "no compiled kernel for this device type"))[1]


def _register_kernels(op: str, attr: str) -> None:
    for key in ("CPU", "CUDA"):
        device_type = key.lower()

        def kernel(a: torch.Tensor, b: torch.Tensor, _attr=attr, _dev=device_type) -> torch.Tensor:
            return getattr(kernels_for(_dev, a.dtype), _attr)(a, b)

        _lib.impl(op, kernel, key)


_register_kernels("adaptive_conv", "forward")
_register_kernels("adaptive_conv_grad_input", "grad_input")
_register_kernels("adaptive_conv_grad_filters", "grad_filters")


@torch.library.register_fake("featup::adaptive_conv")
def _forward_fake(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    B, C = input.shape[:2]
    return input.new_empty((B, C, filters.shape[1], filters.shape[2]))


@torch.library.register_fake("featup::adaptive_conv_grad_input")
def _grad_input_fake(grad_output: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    B, C, H, W = grad_output.shape
    k = filters.shape[-1]
    return grad_output.new_empty((B, C, H + k - 1, W + k - 1))


@torch.library.register_fake("featup::adaptive_conv_grad_filters")
def _grad_filters_fake(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    B, _, H, W = grad_output.shape
    k = input.shape[2] - H + 1
    return grad_output.new_empty((B, H, W, k, k))


def _save_both(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _forward_backward(ctx, grad: torch.Tensor):
    input, filters = ctx.saved_tensors
    grad = grad.contiguous()
    gi = torch.ops.featup.adaptive_conv_grad_input(grad, filters) if ctx.needs_input_grad[0] else None
    gk = torch.ops.featup.adaptive_conv_grad_filters(grad, input) if ctx.needs_input_grad[1] else None
    return gi, gk


def _grad_input_backward(ctx, grad: torch.Tensor):
    grad_output, filters = ctx.saved_tensors
    grad = grad.contiguous()
    gg = torch.ops.featup.adaptive_conv(grad, filters) if ctx.needs_input_grad[0] else None
    gk = torch.ops.featup.adaptive_conv_grad_filters(grad_output, grad) if ctx.needs_input_grad[1] else None
    return gg, gk


def _grad_filters_backward(ctx, grad: torch.Tensor):
    grad_output, input = ctx.saved_tensors
    grad = grad.contiguous()
    gg = torch.ops.featup.adaptive_conv(input, grad) if ctx.needs_input_grad[0] else None
    gx = torch.ops.featup.adaptive_conv_grad_input(grad_output, grad) if ctx.needs_input_grad[1] else None
    return gg, gx


torch.library.register_autograd("featup::adaptive_conv", _forward_backward, setup_context=_save_both)
torch.library.register_autograd("featup::adaptive_conv_grad_input", _grad_input_backward, setup_context=_save_both)
torch.library.register_autograd("featup::adaptive_conv_grad_filters", _grad_filters_backward, setup_context=_save_both)
