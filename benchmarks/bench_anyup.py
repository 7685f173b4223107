"""AnyUp end to end, fused windowed attention vs the dense masked reference, and against our JBU stack.

    python benchmarks/bench_anyup.py            # CPU (and the same cases on CUDA where a GPU exists)
    python benchmarks/bench_anyup.py --quick    # 224 cases only (skips the ~25 s, ~8 GB dense 448 case)
    python benchmarks/bench_anyup.py --rounds 3 # on a busy machine: every case 3 times, interleaved, best kept

Float32, batch 1, 384 channels, random weights (speed does not depend on their values):
- AnyUp 32x32 features -> 448x448 output and 16x16 -> 224x224, `attention="fused"` and `"dense"`;
- JBUStack(384) (random init, 4 stages) 14x14 -> 224x224, the same output size as AnyUp's 224 case.
Every case runs in its own child process (benchmarks/harness.py) so its peak memory is its own.
Targets: at 448, fused >= 3x faster than dense with <= 1/5 of its extra peak memory; at 224, fused AnyUp
no slower than the JBU stack. Writes benchmarks/results/anyup.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

C = 384
ANYUP_CASES = ((32, 448), (16, 224))  # (feature grid, output side)
JBU_GRID = 14  # 14 x 16 = 224


def _anyup_case(attention: str, grid: int, size: int, device: str) -> dict:
    import torch

    import featup_ops

    model = featup_ops.random_anyup(attention).to(device)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=g).to(device)
    feats = torch.randn(1, C, grid, grid, generator=g).to(device)

    def run():
        with torch.no_grad():
            return model(image, feats)

    slow = attention == "dense" and size > 224
    return harness.measure(run, device, C * size * size * 4, warmup=0 if slow else 1, repeat=1 if slow else 3,
                           extra={"torch_threads": torch.get_num_threads()})


def _jbu_case(device: str) -> dict:
    import torch

    import featup_ops

    torch.manual_seed(0)
    stack = featup_ops.JBUStack(C).eval().to(device)
    feats = torch.randn(1, C, JBU_GRID, JBU_GRID, device=device)
    image = torch.randn(1, 3, JBU_GRID * 16, JBU_GRID * 16, device=device)

    def run():
        with torch.no_grad():
            return stack(feats, image)

    return harness.measure(run, device, C * (JBU_GRID * 16) ** 2 * 4, warmup=1, repeat=3,
                           extra={"torch_threads": torch.get_num_threads()})


def child(args: list[str]) -> None:
    if args[0] == "anyup":
        result = _anyup_case(args[1], int(args[2]), int(args[3]), args[4])
    else:
        result = _jbu_case(args[1])
    print(json.dumps(result))


def _row(case: str, impl: str, r: dict) -> dict:
    if "error" in r:
        return {"case": case, "impl": impl, "note": f"error: {r['error']}"}
    return {"case": case, "impl": impl, "median_s": round(r["median_s"], 3), "min_s": round(r["min_s"], 3),
            "runs": r["runs"], "peak_extra_MB": round(r["peak_extra_bytes"] / 2**20),
            "peak_total_MB": round(r["peak_total_bytes"] / 2**20), "raw": r}


def _ratios(fused: dict, baseline: dict, baseline_name: str) -> dict:
    if "error" in fused or "error" in baseline:
        return {"error": fused.get("error") or baseline.get("error")}
    return {f"speedup_vs_{baseline_name}": round(baseline["median_s"] / fused["median_s"], 2),
            f"{baseline_name}_extra_memory_over_fused": round(baseline["peak_extra_bytes"]
                                                               / max(fused["peak_extra_bytes"], 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="224 cases only (smoke run)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA cases even where a GPU exists")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every case this many times, interleaved, keeping each case's fastest round "
                             "(for a busy machine)")
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import torch

    import cuda_ext

    script = Path(__file__).resolve()
    load_before = os.getloadavg()  # other work on the machine skews CPU timings: recorded with them
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    jkey = f"JBUStack {JBU_GRID}->{JBU_GRID * 16}"
    cases: dict[tuple[str, str], list[str]] = {}  # (case, impl) -> child arguments
    for device in devices:
        for grid, size in ANYUP_CASES:
            if args.quick and size > 224:
                continue
            for impl in ("fused", "dense"):
                cases[(f"{device} AnyUp {grid}->{size}", impl)] = ["anyup", impl, str(grid), str(size), device]
        cases[(f"{device} {jkey}", "fused adaptive conv")] = ["jbu", device]
    # Rounds interleave the cases, so a burst of other work on the machine hits them alike; each case keeps
    # its fastest round (all rounds' medians are recorded).
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in cases}
    for n in range(args.rounds):
        for key, child_args in cases.items():
            runs[key].append(harness.run_child(script, *child_args))
            print(f"round {n + 1}: {key[0]} {key[1]}: {runs[key][-1].get('median_s', runs[key][-1])}", flush=True)
    best = {key: min(rs, key=lambda r: r.get("median_s", float("inf"))) for key, rs in runs.items()}
    rows = [{**_row(case, impl, best[(case, impl)]),
             "rounds_median_s": [round(r["median_s"], 3) for r in runs[(case, impl)] if "median_s" in r]}
            for case, impl in cases]
    ratios, targets = {}, {}
    for device in devices:
        for grid, size in ANYUP_CASES:
            key = f"{device} AnyUp {grid}->{size}"
            if (key, "fused") not in best:
                continue
            ratios[key] = _ratios(best[(key, "fused")], best[(key, "dense")], "dense")
            if size == JBU_GRID * 16:
                ratios[f"{key} vs {device} {jkey}"] = _ratios(best[(key, "fused")],
                                                             best[(f"{device} {jkey}", "fused adaptive conv")], "jbu")
    cpu448, cpu224 = ratios.get("cpu AnyUp 32->448", {}), ratios.get(f"cpu AnyUp 16->224 vs cpu {jkey}", {})
    if "speedup_vs_dense" in cpu448:
        targets["cpu 448: fused >= 3x faster than dense"] = cpu448["speedup_vs_dense"] >= 3
        targets["cpu 448: fused extra memory <= 1/5 of dense's"] = cpu448["dense_extra_memory_over_fused"] >= 5
    if "speedup_vs_jbu" in cpu224:
        targets["cpu 224: fused AnyUp no slower than the JBU stack"] = cpu224["speedup_vs_jbu"] >= 1
    print()
    print(harness.table([{k: v for k, v in r.items() if k != "raw"} for r in rows],
                        ["case", "impl", "median_s", "min_s", "runs", "peak_extra_MB", "peak_total_MB",
                         "rounds_median_s", "note"]))
    print()
    for name, met in targets.items():
        print(f"{'met ' if met else 'MISSED'}  {name}")
    path = harness.write_results("anyup", {
        "setup": {"channels": C, "dtype": "float32", "batch": 1, "weights": "random init",
                  "anyup_cases": [f"{g}x{g} -> {s}x{s}" for g, s in ANYUP_CASES if not (args.quick and s > 224)],
                  "jbu_case": f"JBUStack({C}), 4 stages, {JBU_GRID}x{JBU_GRID} -> {JBU_GRID * 16}x{JBU_GRID * 16}",
                  "fused_operator_available": hasattr(cuda_ext, "window_attention"), "quick": args.quick,
                  "rounds": args.rounds,
                  "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                             "after": [round(x, 2) for x in os.getloadavg()]}},
        "cases": rows, "ratios": ratios, "targets": targets})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
