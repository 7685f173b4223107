"""Fused adaptive conv vs the unfold reference, and the whole JBU stack on each, side by side.

    python benchmarks/bench_adaptive_conv.py                 # CPU (and CUDA cases where a GPU exists)
    python benchmarks/bench_adaptive_conv.py --device cuda   # CUDA only: adaptive_conv_gpu.json
    python benchmarks/bench_adaptive_conv.py --device cuda --kernels-only --out base.json   # kernel timings only
    python benchmarks/bench_adaptive_conv.py --device cuda --baseline base.json   # ratios against other kernels

Op cases: C=384, 224x224 output, 7x7 taps, float32, B=1 and B=4, forward and forward+backward.
Stack cases: JBUStack(384), 14x14 -> 224x224 (and 28x28 -> 448x448 on a GPU).
Every case runs in its own child process (benchmarks/harness.py) so peak memory is its own.
On a GPU, each CUDA kernel (forward, input gradient, filter gradient) is also timed alone with CUDA events and
set against its memory floor: the bytes it must move (each operand read once, the result written once) at the
device-to-device copy rate measured in the same run. --baseline takes such timings of other kernels (say, an
earlier version run from another checkout on the same GPU) and adds the speed-up of these over those.
Writes benchmarks/results/adaptive_conv.json (adaptive_conv_gpu.json for --device cuda) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

C, H, W, K = 384, 224, 224, 7
# (B, C, H, W, k) of the CUDA kernel timings: the target shape first; k = 13 takes the runtime-k kernels.
KERNEL_CASES = [(1, 384, 224, 224, 7), (4, 384, 224, 224, 7), (1, 384, 224, 224, 3), (1, 384, 224, 224, 11),
                (1, 32, 224, 224, 3), (1, 64, 112, 112, 13)]
KERNEL_OPS = ("forward", "grad_input", "grad_filters")


def _op_case(impl: str, mode: str, batch: int, device: str) -> dict:
    import torch

    import cuda_ext

    torch.manual_seed(0)
    x = torch.randn(batch, C, H + K - 1, W + K - 1, device=device)
    f = torch.softmax(torch.randn(batch, H, W, K * K, device=device), -1).view(batch, H, W, K, K)
    out_bytes = batch * C * H * W * 4
    per_sample = False
    if impl == "unfold":
        # The unfold path materialises B*C*49*H*W values twice (columns and their product with the taps).
        need = 2 * batch * C * K * K * H * W * 4
        avail = _available_bytes(device)
        per_sample = batch > 1 and need > 0.7 * avail
        op = cuda_ext.adaptive_conv_reference
    else:
        op = cuda_ext.adaptive_conv

    def run_once(xb, fb):
        if mode == "forward":
            with torch.no_grad():
                return op(xb, fb)
        xb = xb.detach().requires_grad_()
        fb = fb.detach().requires_grad_()
        out = op(xb, fb)
        return torch.autograd.grad(out, (xb, fb), torch.ones_like(out))

    def run():
        if per_sample:
            return [run_once(x[i : i + 1], f[i : i + 1]) for i in range(batch)]
        return run_once(x, f)

    return harness.measure(run, device, out_bytes, warmup=1 if impl == "fused" else 0,
                    repeat=5 if impl == "fused" else (2 if mode == "forward" and batch == 1 else 1),
                    extra={"per_sample_loop": per_sample,
                           "implementation": cuda_ext.implementation(device) if impl == "fused" else "unfold"})


def _stack_case(impl: str, batch: int, grid: int, device: str) -> dict:
    import torch

    import cuda_ext
    import featup_ops.jbu as jbu

    if impl == "unfold":  # the same stack with every adaptive-conv-shaped contraction done by unfold
        jbu.cuda_ext = SimpleNamespace(adaptive_conv=cuda_ext.adaptive_conv_reference,
                                       local_dot=cuda_ext.local_dot_reference)
    torch.manual_seed(0)
    stack = jbu.JBUStack(C).eval().to(device)
    feats = torch.randn(batch, C, grid, grid, device=device)
    image = torch.randn(batch, 3, grid * 16, grid * 16, device=device)

    def run():
        with torch.no_grad():
            return stack(feats, image)

    return harness.measure(run, device, batch * C * (grid * 16) ** 2 * 4, warmup=1, repeat=3 if impl == "fused" else 1)


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _cuda_seconds(fn, target_s: float = 0.02, rounds: int = 5) -> float:
    """Median over rounds of the mean GPU time of fn, from CUDA events around enough back-to-back calls to
    fill about target_s."""
    import statistics

    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(3, min(200, int(target_s / max(start.elapsed_time(end) / 1e3, 1e-6))))
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def _copy_bytes_per_second(device: str = "cuda") -> float:
    """Device-to-device copy rate of 1 GiB of float32, counting the bytes read and written."""
    import torch

    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    rate = 2 * src.numel() * 4 / _cuda_seconds(lambda: dst.copy_(src), target_s=0.05)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def kernel_timings(device: str = "cuda") -> dict:
    """Each CUDA kernel alone (torch.ops.featup.*, float32) on KERNEL_CASES, against its memory floor."""
    import torch

    import cuda_ext

    ops = torch.ops.featup
    rate = _copy_bytes_per_second(device)
    rows = []
    for B, Cc, Hh, Ww, k in KERNEL_CASES:
        torch.manual_seed(0)
        x = torch.randn(B, Cc, Hh + k - 1, Ww + k - 1, device=device)
        f = torch.softmax(torch.randn(B, Hh, Ww, k * k, device=device), -1).view(B, Hh, Ww, k, k)
        go = torch.randn(B, Cc, Hh, Ww, device=device)
        calls = {"forward": (ops.adaptive_conv, (x, f)), "grad_input": (ops.adaptive_conv_grad_input, (go, f)),
                 "grad_filters": (ops.adaptive_conv_grad_filters, (go, x))}
        for op in KERNEL_OPS:
            fn, args = calls[op]
            out = fn(*args)
            moved = sum(t.numel() * t.element_size() for t in (*args, out))
            seconds = _cuda_seconds(lambda: fn(*args))
            floor = moved / rate
            rows.append({"case": f"B={B} C={Cc} {Hh}x{Ww} k={k}", "op": op, "us": round(seconds * 1e6, 1),
                         "MB_moved": round(moved / 1e6, 1), "floor_us": round(floor * 1e6, 1),
                         "floor_fraction": round(floor / seconds, 3)})
            print(f"{device} kernel {rows[-1]['case']} {op}: {rows[-1]['us']} us, {rows[-1]['floor_fraction']} of the "
                  f"memory floor ({rows[-1]['floor_us']} us)", flush=True)
            del out
        del x, f, go
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name() if device == "cuda" else device,
            "copy_TB_per_s": round(rate / 1e12, 3), "implementation": cuda_ext.implementation(device),
            "dtype": "float32", "module": _module_file(device), "cases": rows}


def _module_file(device: str) -> str:
    from cuda_ext import build

    result = build.load("adaptive_conv", device)
    return result.module.__file__ if result.module else result.reason


def _against_baseline(kernels: dict, baseline_path: Path) -> dict:
    """Speed-up of these kernels over the baseline file's, case by case (same device required)."""
    base = json.loads(baseline_path.read_text())
    base = base.get("kernels", base)
    if base.get("device") != kernels["device"]:
        raise SystemExit(f"baseline {baseline_path} was measured on {base.get('device')!r}, "
                         f"not on this {kernels['device']!r}: rerun it here")
    before = {(r["case"], r["op"]): r for r in base["cases"]}
    ratios = {}
    for r in kernels["cases"]:
        old = before.get((r["case"], r["op"]))
        if old:
            ratios[f"{r['case']} {r['op']}"] = {"baseline_us": old["us"], "us": r["us"],
                                                 "speedup": round(old["us"] / r["us"], 2),
                                                 "baseline_floor_fraction": old["floor_fraction"],
                                                 "floor_fraction": r["floor_fraction"]}
    return {"file": str(baseline_path), "module": base.get("module"), "ratios": ratios}


def child(args: list[str]) -> None:
    kind = args[0]
    if kind == "op":
        impl, mode, batch, device = args[1], args[2], int(args[3]), args[4]
        result = _op_case(impl, mode, batch, device)
    else:
        impl, batch, grid, device = args[1], int(args[2]), int(args[3]), args[4]
        result = _stack_case(impl, batch, grid, device)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="B=1 op cases only (smoke run)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="where to run: all = the CPU and, where one exists, the GPU")
    parser.add_argument("--kernels-only", action="store_true",
                        help="on the GPU, only time the CUDA kernels alone (no unfold or JBU stack cases)")
    parser.add_argument("--baseline", type=Path, help="kernel timings of other CUDA kernels to compare with")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/adaptive_conv*.json)")
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: no CUDA GPU on this machine")
    devices = {"all": ["cpu"] + (["cuda"] if has_cuda else []), "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    script = Path(__file__).resolve()
    extra = {}
    if "cuda" in devices:
        extra["kernels"] = kernel_timings()
        if args.baseline:
            extra["baseline"] = _against_baseline(extra["kernels"], args.baseline)
            for key, r in extra["baseline"]["ratios"].items():
                print(f"{key}: {r['speedup']}x faster than the baseline ({r['baseline_us']} -> {r['us']} us)")
    name = "adaptive_conv_gpu" if devices == ["cuda"] else "adaptive_conv"
    if args.kernels_only:
        print(f"\nwrote {harness.write_results(name, extra, path=args.out)}")
        return
    rows, ratios = [], {}
    for device in devices:
        for batch in (1,) if args.quick else (1, 4):
            for mode in ("forward", "forward+backward"):
                res = {impl: harness.run_child(script, "op", impl, mode, str(batch), device)
                       for impl in ("fused", "unfold")}
                key = f"{device} op B={batch} {mode}"
                ratios[key] = _ratio(res)
                rows += [_row(key, impl, r) for impl, r in res.items()]
                print(f"{key}: {ratios[key]}", flush=True)
        grids = [14] + ([28] if device == "cuda" else [])
        for grid in () if args.quick else grids:
            res = {impl: harness.run_child(script, "stack", impl, "1", str(grid), device) for impl in ("fused", "unfold")}
            key = f"{device} JBUStack B=1 {grid}->{grid * 16}"
            ratios[key] = _ratio(res)
            rows += [_row(key, impl, r) for impl, r in res.items()]
            print(f"{key}: {ratios[key]}", flush=True)
    summary = ratios
    print()
    print(harness.table([{k: v for k, v in r.items() if k != "raw"} for r in rows], ["case", "impl", "median_s", "peak_extra_MB", "extra/output", "peak_total_MB", "note"]))
    print()
    for key, r in summary.items():
        print(f"{key}: fused is {r.get('speedup', '?')}x faster, uses {r.get('memory_ratio', '?')}x less extra memory")
    path = harness.write_results(name, {"shape": {"C": C, "H": H, "W": W, "k": K, "dtype": "float32"},
                                        "cases": rows, "ratios": summary, **extra}, path=args.out)
    cases = [k for k, v in summary.items() if "speedup" in v]
    timed = {r["case"]: {} for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" in r:
            timed[r["case"]][r["impl"]] = r
    png = harness.bar_chart(path.with_suffix(".png"), "Fused adaptive conv vs unfold reference (log scale)",
                            cases, {impl: [timed[c][impl]["median_s"] for c in cases] for impl in ("fused", "unfold")},
                            "seconds (median)", log=True)
    print(f"\nwrote {path} and {png}")


def _ratio(res: dict) -> dict:
    fused, unfold = res["fused"], res["unfold"]
    if "error" in fused or "error" in unfold:
        return {"error": fused.get("error") or unfold.get("error")}
    return {"speedup": round(unfold["median_s"] / fused["median_s"], 1),
            "memory_ratio": round(unfold["peak_extra_bytes"] / max(fused["peak_extra_bytes"], 1), 1),
            "fused_extra_over_output": fused["peak_extra_over_output"],
            "fused_peak_total_MB": round(fused["peak_total_bytes"] / 2**20)}


def _row(case: str, impl: str, r: dict) -> dict:
    if "error" in r:
        return {"case": case, "impl": impl, "note": f"error: {r['error']}"}
    return {"case": case, "impl": impl, "median_s": round(r["median_s"], 4),
            "peak_extra_MB": round(r["peak_extra_bytes"] / 2**20), "extra/output": r["peak_extra_over_output"],
            "peak_total_MB": round(r["peak_total_bytes"] / 2**20),
            "note": "per-sample loop (batched unfold does not fit in memory)" if r.get("per_sample_loop") else "",
            "raw": r}


if __name__ == "__main__":
    main()
