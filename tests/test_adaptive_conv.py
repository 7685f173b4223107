"""The adaptive-conv operator: fused kernels against the unfold reference and the reference vectors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cuda_ext
from cuda_ext.ops import FALLBACK

from .conftest import ROOT, requires_cuda, requires_nvcc

ops = torch.ops.featup


def random_case(B=2, C=5, H=6, W=9, k=7, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + k - 1, W + k - 1, generator=g, dtype=torch.float64)
    f = torch.randn(B, H, W, k, k, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), f.to(device=device, dtype=dtype)


def test_cpu_kernel_is_compiled_here():
    # This machine has a C++ toolchain: the fused kernel, not the fallback, must serve CPU tensors.
    assert cuda_ext.implementation("cpu") == "compiled"


@pytest.mark.parametrize("impl", ["op", "fallback"])
def test_reference_vectors(conv_vectors, impl):
    v = conv_vectors
    if impl == "op":
        x = v["input"].clone().requires_grad_()
        f = v["filters"].clone().requires_grad_()
        out = cuda_ext.adaptive_conv(x, f)
        out.backward(v["grad_output"])
        gx, gf = x.grad, f.grad
    else:
        out = FALLBACK.forward(v["input"], v["filters"])
        gx = FALLBACK.grad_input(v["grad_output"], v["filters"])
        gf = FALLBACK.grad_filters(v["grad_output"], v["input"])
    torch.testing.assert_close(out, v["output"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, v["grad_input"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gf, v["grad_filters"], rtol=1e-12, atol=1e-12)


def test_unfold_reference_matches_vectors(conv_vectors):
    v = conv_vectors
    torch.testing.assert_close(cuda_ext.adaptive_conv_reference(v["input"], v["filters"]), v["output"])


@pytest.mark.parametrize("shape", [(1, 3, 5, 5, 3), (3, 4, 7, 11, 5), (2, 16, 13, 4, 7), (1, 2, 1, 1, 1), (2, 3, 3, 2, 9)])
def test_matches_reference_forward_and_grads(shape):
    B, C, H, W, k = shape
    x, f = random_case(B, C, H, W, k, seed=sum(shape))
    x1, f1 = x.clone().requires_grad_(), f.clone().requires_grad_()
    x2, f2 = x.clone().requires_grad_(), f.clone().requires_grad_()
    out1 = cuda_ext.adaptive_conv(x1, f1)
    out2 = cuda_ext.adaptive_conv_reference(x2, f2)
    torch.testing.assert_close(out1, out2)
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(f1.grad, f2.grad)
    assert (f1.grad != 0).float().mean() > 0.9  # every tap gets a gradient (the reference CUDA bug)


def test_float32_large_channels():
    x, f = random_case(2, 64, 20, 17, 7, dtype=torch.float32, seed=3)
    torch.testing.assert_close(cuda_ext.adaptive_conv(x, f), cuda_ext.adaptive_conv_reference(x, f),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    x, f = random_case(2, 4, 8, 8, 5, seed=7)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    ft = f.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    assert not xt.is_contiguous() and not ft.is_contiguous()
    xc = x[:, ::1, :, :].expand(2, 4, 12, 12)
    torch.testing.assert_close(cuda_ext.adaptive_conv(xt, ft), cuda_ext.adaptive_conv_reference(x, f))
    torch.testing.assert_close(cuda_ext.adaptive_conv(xc, f), cuda_ext.adaptive_conv_reference(x, f))
    # a channel-sliced view
    big = torch.randn(2, 9, 12, 12, dtype=torch.float64)
    view = big[:, ::2]
    torch.testing.assert_close(cuda_ext.adaptive_conv(view, f), cuda_ext.adaptive_conv_reference(view.contiguous(), f))


def test_gradcheck_float64():
    x, f = random_case(2, 3, 4, 5, 3, seed=11)
    x.requires_grad_()
    f.requires_grad_()
    assert torch.autograd.gradcheck(cuda_ext.adaptive_conv, (x, f))
    assert torch.autograd.gradgradcheck(cuda_ext.adaptive_conv, (x, f))


def test_local_dot_matches_unfold_and_gradchecks():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 4, 9, 10, generator=g, dtype=torch.float64, requires_grad=True)
    out = cuda_ext.local_dot(q, keys)
    torch.testing.assert_close(out, cuda_ext.local_dot_reference(q, keys))
    # spelled out once for a single element
    torch.testing.assert_close(out[1, 2, 3, 4, 1], (q[1, :, 2, 3] * keys[1, :, 2 + 4, 3 + 1]).sum())
    assert torch.autograd.gradcheck(cuda_ext.local_dot, (q, keys))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    # Positive inputs and 11x11 taps: partial sums grow, so 16-bit accumulation would drift by many ulps.
    g = torch.Generator().manual_seed(2)
    B, C, H, W, k = 1, 8, 12, 12, 11
    x = (torch.rand(B, C, H + k - 1, W + k - 1, generator=g) + 0.5).to(dtype)
    f = (torch.rand(B, H, W, k, k, generator=g) + 0.5).to(dtype)
    exact = cuda_ext.adaptive_conv_reference(x.double(), f.double())
    out = cuda_ext.adaptive_conv(x, f)
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert ((out.double() - exact).abs() <= ulp).all(), "error beyond one ulp of the exact result"
    x.requires_grad_()
    f.requires_grad_()
    out = cuda_ext.adaptive_conv(x, f)
    go = torch.ones_like(out)
    gx, gf = torch.autograd.grad(out, (x, f), go)
    xd, fd = x.detach().double().requires_grad_(), f.detach().double().requires_grad_()
    ex_gx, ex_gf = torch.autograd.grad(cuda_ext.adaptive_conv_reference(xd, fd), (xd, fd), go.double())
    assert ((gf.double() - ex_gf).abs() <= torch.finfo(dtype).eps * ex_gf.abs() + 1e-6).all()
    assert ((gx.double() - ex_gx).abs() <= torch.finfo(dtype).eps * ex_gx.abs() + 1e-6).all()


def test_opcheck_registration():
    x, f = random_case(1, 3, 4, 4, 3, dtype=torch.float32, seed=1)
    x.requires_grad_()
    f.requires_grad_()
    torch.library.opcheck(ops.adaptive_conv, (x, f))
    go = torch.randn(1, 3, 4, 4, requires_grad=True)
    torch.library.opcheck(ops.adaptive_conv_grad_input, (go, f))
    torch.library.opcheck(ops.adaptive_conv_grad_filters, (go, x))


def test_torch_compile_traces_the_op():
    x, f = random_case(2, 3, 6, 5, 3, dtype=torch.float32, seed=4)

    def fn(a, b):
        return cuda_ext.adaptive_conv(a * 2, b).relu().sum(dim=1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, f), fn(x, f))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 6, 6, 3, 3)), ValueError, "rank 4"),
        (lambda: (torch.randn(2, 3, 8, 8), torch.randn(2, 6, 6, 9)), ValueError, "rank 5"),
        (lambda: (torch.randn(2, 3, 9, 8), torch.randn(2, 6, 6, 3, 3)), ValueError, "plus k-1"),
        (lambda: (torch.randn(2, 3, 8, 8), torch.randn(1, 6, 6, 3, 3)), ValueError, "batch sizes differ"),
        (lambda: (torch.randn(2, 3, 9, 9), torch.randn(2, 6, 6, 4, 4)), ValueError, "odd"),
        (lambda: (torch.randn(2, 3, 9, 9), torch.randn(2, 6, 6, 3, 4)), ValueError, "square"),
        (lambda: (torch.ones(2, 3, 8, 8, dtype=torch.int32), torch.randn(2, 6, 6, 3, 3)), TypeError, "float16"),
        (lambda: (torch.randn(2, 3, 8, 8), torch.randn(2, 6, 6, 3, 3, dtype=torch.float64)), TypeError, "share a dtype"),
        (lambda: ([1, 2], torch.randn(2, 6, 6, 3, 3)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_calls_raise_clear_errors(make, error, match):
    a, b = make()
    with pytest.raises(error, match=match):
        cuda_ext.adaptive_conv(a, b)


def test_import_survives_a_failed_build(tmp_path):
    """A broken compiler: import works, one warning names the reason, results stay right."""
    script = textwrap.dedent(
        """
        import warnings, torch
        import cuda_ext
        v = torch.load("tests/data/adaptive_conv_vectors.pt", weights_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out1 = cuda_ext.adaptive_conv(v["input"], v["filters"])
            out2 = cuda_ext.adaptive_conv(v["input"], v["filters"])
        msgs = [str(w.message) for w in caught if "adaptive_conv" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "unavailable" in msgs[0] and "fallback" in msgs[0], msgs[0]
        torch.testing.assert_close(out1, v["output"])
        assert cuda_ext.implementation("cpu") != "compiled"
        print("REASON", cuda_ext.implementation("cpu"))
        """
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="/bin/false")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON" in proc.stdout and "Error" in proc.stdout


@pytest.mark.slow
@requires_nvcc
def test_cuda_kernel_compiles():
    """Compiles the CUDA kernels with nvcc (no GPU needed to compile)."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    proc = subprocess.run([sys.executable, "-m", "cuda_ext.build", "--cuda", "yes"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "cuda: built" in proc.stdout


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("k", [3, 7, 11])
def test_cuda_matches_reference(dtype, tol, k):
    assert cuda_ext.implementation("cuda") == "compiled"
    x, f = random_case(2, 40, 19, 23, k, dtype=torch.float64, seed=k)
    x = x.cuda().to(dtype).requires_grad_()
    f = f.cuda().to(dtype).requires_grad_()
    xd, fd = x.detach().double().requires_grad_(), f.detach().double().requires_grad_()
    out = cuda_ext.adaptive_conv(x, f)
    exp = cuda_ext.adaptive_conv_reference(xd, fd)
    scale = exp.abs().max()
    assert ((out.double() - exp).abs().max() / scale) < tol
    go = torch.randn_like(exp)
    gx, gf = torch.autograd.grad(out, (x, f), go.to(dtype))
    ex_gx, ex_gf = torch.autograd.grad(exp, (xd, fd), go)
    assert ((gx.double() - ex_gx).abs().max() / ex_gx.abs().max()) < tol
    assert ((gf.double() - ex_gf).abs().max() / ex_gf.abs().max()) < tol
    assert (gf != 0).float().mean() > 0.99  # all k*k taps receive a gradient


@requires_cuda
def test_cuda_gradcheck_float64_and_compile():
    x, f = random_case(1, 3, 5, 4, 3, device="cuda", seed=2)
    x.requires_grad_()
    f.requires_grad_()
    assert torch.autograd.gradcheck(cuda_ext.adaptive_conv, (x, f))
    xf, ff = x.detach().float(), f.detach().float()
    compiled = torch.compile(lambda a, b: cuda_ext.adaptive_conv(a, b) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(xf, ff), cuda_ext.adaptive_conv(xf, ff) * 2)
