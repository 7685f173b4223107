"""Fused adaptive conv vs the unfold reference, and the whole JBU stack on each, side by side.

    python benchmarks/bench_adaptive_conv.py            # CPU (and CUDA cases where a GPU exists)

Op cases: C=384, 224x224 output, 7x7 taps, float32, B=1 and B=4, forward and forward+backward.
Stack cases: JBUStack(384), 14x14 -> 224x224 (and 28x28 -> 448x448 on a GPU).
Every case runs in its own child process (benchmarks/harness.py) so peak memory is its own.
Writes benchmarks/results/adaptive_conv.json and prints a table.
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
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    script = Path(__file__).resolve()
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
    path = harness.write_results("adaptive_conv", {"shape": {"C": C, "H": H, "W": W, "k": K, "dtype": "float32"},
                                                   "cases": rows, "ratios": summary})
    cases = [k for k, v in summary.items() if "speedup" in v]
    timed = {r["case"]: {} for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" in r:
            timed[r["case"]][r["impl"]] = r
    png = harness.bar_chart(harness.RESULTS / "adaptive_conv.png", "Fused adaptive conv vs unfold reference (log scale)",
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
