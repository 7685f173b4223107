"""Fused windowed cross-attention vs the dense masked reference, at AnyUp's two working sizes.

    python benchmarks/bench_window_attention.py            # CPU (and CUDA cases where a GPU exists)
    python benchmarks/bench_window_attention.py --quick    # the 224 cases only
    python benchmarks/bench_window_attention.py --device cuda   # GPU only: window_attention_gpu.json

Shapes as AnyUp calls the operator: batch 1, 4 heads of width 32, 384 value channels, AnyUp's windows,
float32; 448x448 queries over a 32x32 key grid and 224x224 over 16x16. Forward (inference) for both, and
forward+backward in q and k (as AnyUp trains: the values are the backbone's features) at 224.
Every case runs in its own child process (benchmarks/harness.py) so peak memory is its own.
Writes benchmarks/results/window_attention.json and a chart, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

N, D, C = 4, 32, 384
SIZES = {"448 from 32": (448, 32), "224 from 16": (224, 16)}
IMPLS = ("fused", "dense")


def _case(impl: str, size: str, mode: str, device: str) -> dict:
    import torch

    import cuda_ext

    Hq, h = SIZES[size]
    torch.manual_seed(0)
    q = torch.randn(1, N, Hq, Hq, D, device=device)
    k = torch.randn(1, N, h, h, D, device=device)
    v = torch.randn(1, C, h, h, device=device)
    rows, cols = cuda_ext.anyup_windows(Hq, Hq, h, h)
    op = cuda_ext.window_attention if impl == "fused" else cuda_ext.window_attention_reference

    def run():
        if mode == "forward":
            with torch.no_grad():
                return op(q, k, v, rows, cols)
        qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
        out = op(qg, kg, v, rows, cols)
        return torch.autograd.grad(out, (qg, kg), torch.ones_like(out))

    heavy = impl == "dense" and Hq >= 448
    return harness.measure(run, device, C * Hq * Hq * 4, warmup=0 if heavy else 1, repeat=1 if heavy else 3,
                           extra={"implementation": cuda_ext.implementation(device, "window_attention")
                                  if impl == "fused" else "dense reference"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the 224 cases only (smoke run)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="where to run: all = the CPU and, where one exists, the GPU")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_case(*args.child)))
        return

    import torch

    script = Path(__file__).resolve()
    cases = [("448 from 32", "forward"), ("224 from 16", "forward"), ("224 from 16", "forward+backward")]
    if args.quick:
        cases = cases[1:]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU on this machine")
    devices = {"all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    name = "window_attention_gpu" if devices == ["cuda"] else "window_attention"
    rows, ratios = [], {}
    for device in devices:
        for size, mode in cases:
            res = {impl: harness.run_child(script, impl, size, mode, device) for impl in IMPLS}
            key = f"{device} {size} {mode}"
            ratios[key] = _ratio(res)
            rows += [_row(key, impl, r) for impl, r in res.items()]
            print(f"{key}: {ratios[key]}", flush=True)
    print()
    print(harness.table([{k: v for k, v in r.items() if k != "raw"} for r in rows],
                        ["case", "impl", "median_s", "peak_extra_MB", "extra/output", "note"]))
    path = harness.write_results(name, {
        "shape": {"heads": N, "head_width": D, "channels": C, "batch": 1, "dtype": "float32",
                  "windows": "cuda_ext.anyup_windows (ratio 0.1)", "sizes": {k: {"queries": f"{a}x{a}", "keys": f"{b}x{b}"}
                                                                        for k, (a, b) in SIZES.items()}},
        "cases": rows, "ratios": ratios})
    timed = [k for k, v in ratios.items() if "speedup" in v]
    by_case = {(r["case"], r["impl"]): r for r in rows if "median_s" in r}
    png = harness.bar_chart(path.with_suffix(".png"), "Fused windowed attention vs dense reference",
                            timed, {impl: [by_case[(c, impl)]["median_s"] for c in timed] for impl in IMPLS},
                            "seconds (median, log scale)", log=True)
    print(f"\nwrote {path} and {png}")


def _ratio(res: dict) -> dict:
    fused, dense = res["fused"], res["dense"]
    if "error" in fused or "error" in dense:
        return {"error": fused.get("error") or dense.get("error")}
    return {"speedup": round(dense["median_s"] / fused["median_s"], 1),
            "memory_ratio": round(dense["peak_extra_bytes"] / max(fused["peak_extra_bytes"], 1), 1),
            "fused_extra_over_output": fused["peak_extra_over_output"]}


def _row(case: str, impl: str, r: dict) -> dict:
    if "error" in r:
        return {"case": case, "impl": impl, "note": f"error: {r['error']}"}
    return {"case": case, "impl": impl, "median_s": round(r["median_s"], 4),
            "peak_extra_MB": round(r["peak_extra_bytes"] / 2**20), "extra/output": r["peak_extra_over_output"],
            "note": r["implementation"], "raw": r}


if __name__ == "__main__":
    main()
