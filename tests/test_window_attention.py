"""The windowed cross-attention operator: fused kernels and the row-run fallback against the dense reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch

import cuda_ext
from cuda_ext.attention_reference import FALLBACK

from .conftest import ROOT, compile_cuda_family, requires_cuda, requires_nvcc

ops = torch.ops.featup


def random_case(B=1, N=4, Hq=7, Wq=9, h=3, w=4, d=32, C=5, dtype=torch.float64, seed=0, windows="anyup"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, Wq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, h, w, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    if windows == "anyup":
        rows, cols = cuda_ext.anyup_windows(Hq, Wq, h, w)
    elif windows == "random":  # arbitrary, non-monotone windows, many touching a border
        rows, cols = (random_windows(n, extent, g) for n, extent in ((Hq, h), (Wq, w)))
    else:  # every key for every query: plain attention
        rows = torch.tensor([[0, h]] * Hq)
        cols = torch.tensor([[0, w]] * Wq)
    return q.to(dtype), k.to(dtype), v.to(dtype), rows, cols


def random_windows(n: int, extent: int, g: torch.Generator) -> torch.Tensor:
    centre = torch.randint(0, extent, (n,), generator=g)
    radius = torch.randint(0, 3, (n,), generator=g)
    return torch.stack([(centre - radius).clamp(min=0), (centre + radius + 1).clamp(max=extent)], dim=1)


def reference_and_grads(q, k, v, rows, cols, grad):
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = cuda_ext.window_attention_reference(qr, kr, vr, rows, cols)
    return out, torch.autograd.grad(out, (qr, kr, vr), grad)


def test_cpu_kernel_is_compiled_here():
    # This machine has a C++ toolchain: the fused kernel, not the fallback, must serve CPU tensors.
    assert cuda_ext.implementation("cpu", "window_attention") == "compiled"


SHAPES = {  # B, N, Hq, Wq, h, w, d, C, windows
    "anyup-small": (1, 4, 7, 9, 3, 4, 32, 5, "anyup"),
    "non-square": (2, 4, 20, 37, 5, 7, 32, 3, "anyup"),
    "one-channel-d7": (1, 2, 17, 33, 4, 6, 7, 1, "anyup"),
    "d12-wide": (2, 3, 5, 40, 2, 9, 12, 40, "anyup"),
    "c384-small-grid": (1, 4, 6, 10, 4, 5, 32, 384, "anyup"),
    "random-clipped": (2, 4, 11, 19, 6, 8, 32, 9, "random"),
    "full-window": (1, 1, 3, 5, 4, 3, 5, 2, "full"),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_and_fallback_match_reference(name):
    B, N, Hq, Wq, h, w, d, C, windows = SHAPES[name]
    q, k, v, rows, cols = random_case(B, N, Hq, Wq, h, w, d, C, seed=len(name), windows=windows)
    grad = torch.randn(B, C, Hq, Wq, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = reference_and_grads(q, k, v, rows, cols, grad)

    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out = cuda_ext.window_attention(qf, kf, vf, rows, cols)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(out, (qf, kf, vf), grad), expected_grads):
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-12)

    torch.testing.assert_close(FALLBACK.forward(q, k, v, rows, cols), expected, rtol=1e-12, atol=1e-12)
    for got, exp in zip(FALLBACK.backward(grad, q, k, v, rows, cols, True, True, True), expected_grads):
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-12)


def test_one_element_spelled_out():
    q, k, v, rows, cols = random_case(B=1, N=2, Hq=5, Wq=6, h=4, w=4, d=3, C=2, seed=3)
    out = cuda_ext.window_attention(q, k, v, rows, cols)
    b, c, i, j = 0, 1, 3, 2
    (y0, y1), (x0, x1) = rows[i].tolist(), cols[j].tolist()
    keys = [(y, x) for y in range(y0, y1) for x in range(x0, x1)]
    attn = 0
    for n in range(2):
        logits = torch.stack([q[b, n, i, j] @ k[b, n, y, x] / math.sqrt(3) for y, x in keys])
        attn = attn + logits.softmax(0) / 2
    expected = sum(a * v[b, c, y, x] for a, (y, x) in zip(attn, keys))
    torch.testing.assert_close(out[b, c, i, j], expected)


def test_unrequested_gradients_are_skipped():
    q, k, v, rows, cols = random_case(B=1, N=2, Hq=6, Wq=5, h=3, w=3, d=4, C=3, seed=4)
    grad = torch.randn(1, 3, 6, 5, dtype=torch.float64)
    _, (eq, ek, ev) = reference_and_grads(q, k, v, rows, cols, grad)
    for mask in ((True, False, False), (False, True, False), (False, False, True)):
        got = ops.window_attention_backward(grad, q, k, v, rows, cols, *mask)
        for g, want, exp in zip(got, mask, (eq, ek, ev)):
            if want:
                torch.testing.assert_close(g, exp, rtol=1e-11, atol=1e-12)
            else:
                assert g.numel() == 0
    # autograd asks only for what needs it: v as a constant, the raw features in AnyUp.
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.autograd.grad(cuda_ext.window_attention(qg, kg, v, rows, cols), (qg, kg), grad)
    torch.testing.assert_close(gq, eq, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gk, ek, rtol=1e-11, atol=1e-12)


def test_zero_channels():
    q, k, v, rows, cols = random_case(B=2, N=2, Hq=4, Wq=3, h=2, w=2, d=3, C=0, seed=14)
    q.requires_grad_()
    out = cuda_ext.window_attention(q, k, v, rows, cols)
    assert out.shape == (2, 0, 4, 3)
    (gq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    assert gq.shape == q.shape and (gq == 0).all()


def test_gradcheck_float64():
    q, k, v, rows, cols = random_case(B=2, N=2, Hq=5, Wq=7, h=3, w=4, d=3, C=2, seed=5)
    args = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: cuda_ext.window_attention(a, b, c, rows, cols), args)


def test_double_backward_says_it_is_unsupported():
    q, k, v, rows, cols = random_case(B=1, N=1, Hq=3, Wq=3, h=2, w=2, d=2, C=1, seed=6)
    q.requires_grad_()
    (gq,) = torch.autograd.grad(cuda_ext.window_attention(q, k, v, rows, cols).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        gq.sum().backward()


def test_float32_many_channels():
    q, k, v, rows, cols = random_case(B=1, N=4, Hq=45, Wq=50, h=8, w=9, d=32, C=96, dtype=torch.float32, seed=7)
    grad = torch.randn(1, 96, 45, 50)
    expected, expected_grads = reference_and_grads(q.double(), k.double(), v.double(), rows, cols, grad.double())
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out = cuda_ext.window_attention(qf, kf, vf, rows, cols)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, exp in zip(torch.autograd.grad(out, (qf, kf, vf), grad), expected_grads):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4 * exp.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    # Full 16x16 windows (256 keys) and positive values: every output is a 256-term weighted sum, and the
    # backward sums over 256 keys or 60 queries. Stated tolerance: one unit in the last place of the 16-bit
    # result (its rounding is half of that) plus 1e-5 of the largest value, for the float32 arithmetic.
    # Accumulating in 16 bits would drift by many ulps.
    q, k, v, rows, cols = random_case(B=1, N=4, Hq=6, Wq=10, h=16, w=16, d=32, C=8, seed=8, windows="full",
                                      dtype=torch.float32)
    q, k, v = q.to(dtype) * 0.3, k.to(dtype), (v.abs() + 0.5).to(dtype)
    grad = (torch.rand(1, 8, 6, 10, generator=torch.Generator().manual_seed(9)) + 0.5).to(dtype)
    expected, expected_grads = reference_and_grads(q.float(), k.float(), v.float(), rows, cols, grad.float())

    def within(got, exp):
        assert got.dtype == dtype
        bound = torch.finfo(dtype).eps * exp.abs() + 1e-5 * exp.abs().max()
        assert ((got.float() - exp).abs() <= bound).all(), f"max excess {((got.float() - exp).abs() - bound).max()}"

    qh, kh, vh = (t.clone().requires_grad_() for t in (q, k, v))
    out = cuda_ext.window_attention(qh, kh, vh, rows, cols)
    within(out, expected)
    for got, exp in zip(torch.autograd.grad(out, (qh, kh, vh), grad), expected_grads):
        within(got, exp)


def test_non_contiguous_inputs():
    q, k, v, rows, cols = random_case(B=2, N=3, Hq=8, Wq=9, h=4, w=5, d=6, C=4, seed=10)
    qs = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    ks = torch.stack([k, -k], dim=-1)[..., 0]  # every other element of a bigger buffer
    vs = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    rows_s = torch.stack([rows, rows], dim=2)[..., 0]
    assert not any(t.is_contiguous() for t in (qs, ks, vs, rows_s))
    torch.testing.assert_close(cuda_ext.window_attention(qs, ks, vs, rows_s, cols),
                               cuda_ext.window_attention_reference(q, k, v, rows, cols))


def _float32_windows(n_out: int, n_in: int, ratio: float = 0.1) -> np.ndarray:
    """The spec's step 4 in numpy float32, one operation at a time."""
    f = np.float32
    r = (np.arange(n_out, dtype=f) + f(0.5)) / f(n_out)
    start = np.floor(np.clip(r - f(ratio), f(0), f(1)) * f(n_in))
    end = np.ceil(np.clip(r + f(ratio), f(0), f(1)) * f(n_in))
    return np.stack([start, end], axis=1).astype(np.int64)


def _exact_windows(n_out: int, n_in: int) -> np.ndarray:
    """The same rule in exact rational arithmetic (what float32 departs from at ties)."""
    out = []
    for i in range(n_out):
        r = Fraction(2 * i + 1, 2 * n_out)
        lo, hi = min(max(r - Fraction(1, 10), 0), 1), min(max(r + Fraction(1, 10), 0), 1)
        out.append((math.floor(lo * n_in), math.ceil(hi * n_in)))
    return np.array(out, dtype=np.int64)


def test_anyup_windows_follow_the_float32_rule_including_ties():
    ties = 0
    for n_out in (1, 3, 5, 7, 10, 14, 16, 25, 30, 56, 72, 224, 448):
        for n_in in (1, 2, 5, 7, 9, 10, 14, 16, 25, 32):
            rows, cols = cuda_ext.anyup_windows(n_out, 3, n_in, 2)
            expected = _float32_windows(n_out, n_in)
            np.testing.assert_array_equal(rows.numpy(), expected, err_msg=f"{n_out} queries over {n_in} keys")
            ties += int((expected != _exact_windows(n_out, n_in)).any(axis=1).sum())
            assert rows.dtype == torch.int64 and (rows[:, 0] < rows[:, 1]).all()
            np.testing.assert_array_equal(cols.numpy(), _float32_windows(3, 2))
    assert ties >= 10, "the grid must contain rows where float32 and exact arithmetic disagree"
    # Two ties spelled out: (3 + 0.5) / 5 - 0.1 = 0.6 exactly, but 0.7f - 0.1f is just below 0.6f, so 5 keys
    # give floor(2.9999998) = 2; and 0.5f + 0.1f is just above 0.6f, so 25 keys give ceil(15.000001) = 16.
    assert cuda_ext.anyup_windows(5, 1, 5, 1)[0][3].tolist() == [2, 4]
    assert cuda_ext.anyup_windows(1, 1, 25, 1)[0][0].tolist() == [10, 16]


def test_anyup_windows_rejects_bad_sizes():
    with pytest.raises(ValueError, match="Hq must be a positive int"):
        cuda_ext.anyup_windows(0, 4, 2, 2)
    with pytest.raises(ValueError, match="ratio must lie in"):
        cuda_ext.anyup_windows(4, 4, 2, 2, ratio=0.0)


def test_opcheck_registration():
    q, k, v, rows, cols = random_case(B=1, N=2, Hq=4, Wq=5, h=3, w=3, d=4, C=3, dtype=torch.float32, seed=11)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(ops.window_attention, (q, k, v, rows, cols))
    grad = torch.randn(1, 3, 4, 5)
    torch.library.opcheck(ops.window_attention_backward, (grad, q.detach(), k.detach(), v.detach(), rows, cols,
                                                          True, True, True))
    torch.library.opcheck(ops.window_attention_backward, (grad, q.detach(), k.detach(), v.detach(), rows, cols,
                                                          False, True, False))


def test_torch_compile_traces_forward_and_backward():
    q, k, v, rows, cols = random_case(B=1, N=4, Hq=9, Wq=8, h=3, w=3, d=8, C=4, dtype=torch.float32, seed=12)

    def fn(a, b, c):
        return cuda_ext.window_attention(a * 2, b, c, rows, cols).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, args)
    ref_args = [t.clone().requires_grad_() for t in (q, k, v)]
    want = fn(*ref_args)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, torch.autograd.grad(want, ref_args)):
        torch.testing.assert_close(a, b)


def _bad(**changes):
    q, k, v, rows, cols = random_case(B=2, N=2, Hq=4, Wq=5, h=3, w=3, d=4, C=2, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, rows=rows, cols=cols)
    args.update({name: change(args) for name, change in changes.items()})
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(q=lambda a: a["q"][0]), ValueError, r"q must have rank 5 \(B, N, Hq, Wq, d\)"),
        (_bad(v=lambda a: a["v"][:, :, :2]), ValueError, r"must lie on the key grid of k"),
        (_bad(k=lambda a: a["k"][..., :3]), ValueError, r"heads and head width of q"),
        (_bad(k=lambda a: a["k"][:1]), ValueError, "batch sizes differ"),
        (_bad(k=lambda a: a["k"].double()), TypeError, "share a dtype"),
        (_bad(q=lambda a: a["q"].int()), TypeError, "float16, bfloat16, float32 or float64"),
        (_bad(rows=lambda a: a["rows"].float()), ValueError, r"rows must be an int64 tensor of shape \(4, 2\)"),
        (_bad(cols=lambda a: a["cols"][:4]), ValueError, r"cols must be an int64 tensor of shape \(5, 2\)"),
        (_bad(rows=lambda a: torch.tensor([[0, 2], [1, 4], [1, 3], [2, 3]])), ValueError,
         r"rows\[1\] = \[1, 4\) is not a non-empty range of key rows inside \[0, 3\)"),
        (_bad(cols=lambda a: torch.tensor([[0, 2], [1, 3], [2, 2], [0, 1], [1, 2]])), ValueError,
         r"cols\[2\] = \[2, 2\) is not a non-empty range of key columns"),
        (_bad(cols=lambda a: torch.tensor([[-1, 2]] * 5)), ValueError, r"cols\[0\] = \[-1, 2\)"),
        (_bad(rows=lambda a: [[0, 1]] * 4), TypeError, "rows must be an int64 tensor"),
    ],
)
def test_bad_calls_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        cuda_ext.window_attention(**args)


def test_kernels_check_windows_themselves():
    # Calls that bypass the Python checks (torch.ops directly, compiled graphs) still get a clear error.
    args = _bad(rows=lambda a: torch.tensor([[0, 2], [1, 4], [1, 3], [2, 3]]))
    with pytest.raises(RuntimeError, match=r"rows\[1\] = \[1, 4\) is not a non-empty range of key rows"):
        ops.window_attention(*args.values())
    with pytest.raises(ValueError, match=r"rows\[1\] = \[1, 4\)"):
        FALLBACK.forward(*args.values())


def test_import_survives_a_failed_build(tmp_path):
    """A broken compiler: one warning names the reason, the fallback gives the reference's results."""
    script = textwrap.dedent(
        """
        import warnings, torch
        import cuda_ext
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(1, 4, 9, 11, 8, generator=g), torch.randn(1, 4, 3, 4, 8, generator=g)
        v = torch.randn(1, 5, 3, 4, generator=g)
        rows, cols = cuda_ext.anyup_windows(9, 11, 3, 4)
        q.requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cuda_ext.window_attention(q, k, v, rows, cols)
            out2 = cuda_ext.window_attention(q, k, v, rows, cols)
            (gq,) = torch.autograd.grad(out.sum(), q)
        msgs = [str(w.message) for w in caught if "window_attention" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "unavailable" in msgs[0] and "fallback" in msgs[0], msgs[0]
        ref = cuda_ext.window_attention_reference(q, k, v, rows, cols)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gq, torch.autograd.grad(ref.sum(), q)[0])
        print("REASON", cuda_ext.implementation("cpu", "window_attention"))
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
    """Compiles the window-attention CUDA kernels with nvcc (no GPU needed to compile)."""
    # The built module loads without a GPU; its entry points refuse bad operands before any CUDA call.
    compile_cuda_family("window_attention", """
        import torch
        from cuda_ext import build
        m = build.load("window_attention", "cuda").module
        q, k, v = torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 2, 2, 4), torch.zeros(1, 5, 2, 2)
        rows = cols = torch.tensor([[0, 1], [0, 2], [1, 2]])
        for fn, args, match in [
            (m.forward, (q, k, v, rows, cols), "q must be a CUDA tensor, got cpu"),
            (m.backward, (torch.zeros(1, 5, 3, 3), q, k, v, rows, cols, True, True, True),
             "q must be a CUDA tensor, got cpu"),
        ]:
            try:
                fn(*args)
            except RuntimeError as e:
                assert match in str(e), str(e)
            else:
                raise AssertionError("accepted: " + match)
        print("CHECKED")
        """)


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", ["non-square", "c384-small-grid", "random-clipped", "full-window"])
def test_cuda_matches_reference(dtype, tol, name):
    assert cuda_ext.implementation("cuda", "window_attention") == "compiled"
    B, N, Hq, Wq, h, w, d, C, windows = SHAPES[name]
    q, k, v, rows, cols = random_case(B, N, Hq, Wq, h, w, d, C, seed=len(name), windows=windows)
    grad = torch.randn(B, C, Hq, Wq, dtype=torch.float64)
    expected, expected_grads = reference_and_grads(q, k, v, rows, cols, grad)
    xs = [t.cuda().to(dtype).requires_grad_() for t in (q, k, v)]
    out = cuda_ext.window_attention(*xs, rows, cols)
    assert out.dtype == dtype and out.is_cuda

    def rel(a, b):
        return ((a.double().cpu() - b).abs().max() / b.abs().max()).item()

    assert rel(out, expected) < tol
    for got, exp in zip(torch.autograd.grad(out, xs, grad.cuda().to(dtype)), expected_grads):
        assert rel(got, exp) < tol


@requires_cuda
def test_cuda_windows_on_device_and_compile():
    q, k, v, rows, cols = random_case(B=1, N=4, Hq=30, Wq=17, h=6, w=5, d=32, C=20, dtype=torch.float32, seed=13)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    expected = cuda_ext.window_attention_reference(q, k, v, rows, cols)
    torch.testing.assert_close(cuda_ext.window_attention(q, k, v, rows.cuda(), cols.cuda()), expected,
                               rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda a, b, c: cuda_ext.window_attention(a, b, c, rows, cols) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), expected * 2, rtol=1e-5, atol=1e-5)
