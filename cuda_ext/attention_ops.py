"""The windowed cross-attention as PyTorch operators in the `featup` namespace.

    featup::window_attention(q, k, v, rows, cols) -> out
        out[b,c,i,j] = sum_{rows[i,0] <= y < rows[i,1], cols[j,0] <= x < cols[j,1]} A[b,i,j,y,x] v[b,c,y,x]
        A = mean over heads n of softmax over the window of q[b,n,i,j] . k[b,n,y,x] * d**-0.5
    featup::window_attention_backward(grad_output, q, k, v, rows, cols, need_q, need_k, need_v) -> (dq, dk, dv)
        the three gradients (recomputing the attention); an unrequested one is an empty tensor.

CPU and CUDA kernels are the compiled `window_attention` extensions when they build, else the pure-PyTorch
row-run kernels (one warning naming the reason). Fake kernels give shapes for tracing. The windows are
integer data and take no gradient; the backward op has no derivative of its own (no double backward).
"""

from __future__ import annotations

import torch

from . import attention_reference
from .ops import kernels_for, register_fallback

FAMILY = "window_attention"

_lib = torch.library.Library("featup", "FRAGMENT")
_lib.define("window_attention(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor cols) -> Tensor")
_lib.define("window_attention_backward(Tensor grad_output, Tensor q, Tensor k, Tensor v, Tensor rows, Tensor cols, "
            "bool need_q, bool need_k, bool need_v) -> (Tensor, Tensor, Tensor)")

register_fallback(FAMILY, attention_reference.FALLBACK)


def _forward_kernel(device_type: str):
    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
        return kernels_for(device_type, q.dtype, FAMILY).forward(q, k, v, rows, cols)

    return kernel


def _backward_kernel(device_type: str):
    def kernel(grad_output: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, need_q: bool, need_k: bool, need_v: bool):
        grads = kernels_for(device_type, q.dtype, FAMILY).backward(grad_output, q, k, v, rows, cols, need_q, need_k,
                                                                    need_v)
        return tuple(grads)

    return kernel


for _key in ("CPU", "CUDA"):
    _lib.impl("window_attention", _forward_kernel(_key.lower()), _key)
    _lib.impl("window_attention_backward", _backward_kernel(_key.lower()), _key)


@torch.library.register_fake("featup::window_attention")
def _forward_fake(q, k, v, rows, cols):
    return q.new_empty((q.shape[0], v.shape[1], q.shape[2], q.shape[3]))


@torch.library.register_fake("featup::window_attention_backward")
def _backward_fake(grad_output, q, k, v, rows, cols, need_q, need_k, need_v):
    return tuple(t.new_empty(t.shape) if need else q.new_empty(0) for t, need in ((q, need_q), (k, need_k), (v, need_v)))


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    q, k, v, rows, cols = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if not (need_q or need_k or need_v):
        return None, None, None, None, None
    dq, dk, dv = torch.ops.featup.window_attention_backward(grad.contiguous(), q, k, v, rows, cols,
                                                            need_q, need_k, need_v)
    return dq if need_q else None, dk if need_k else None, dv if need_v else None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "featup::window_attention has no second derivative (its backward op is not differentiable); "
        "differentiate window_attention_reference instead if you need higher-order gradients"
    )


torch.library.register_autograd("featup::window_attention", _backward, setup_context=_save_inputs)
torch.library.register_autograd("featup::window_attention_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
