"""Shared benchmark plumbing: child-process measurements, peak memory, results files.

Each measurement runs in a fresh child process so its peak resident memory is its own. Peak extra
memory is read from the kernel: /proc/self/clear_refs resets VmHWM after the inputs are allocated, and
VmHWM after the operation minus VmRSS before it is what the operation added.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Resets the peak-RSS counter; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def time_it(fn: Callable[[], object], repeat: int, warmup: int = 1) -> dict:
    """Median and min wall time of `fn` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeat}


def measure(run: Callable[[], object], device: str, out_bytes: int, warmup: int, repeat: int,
            extra: dict | None = None) -> dict:
    """Peak extra memory of one run of `run` (after `warmup` runs), then its wall time over `repeat` runs.

    Extra memory is peak RSS (CPU) or peak allocated CUDA memory above what existed before the run.
    """
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        run()
        sync()

    for _ in range(warmup):
        timed()
    # Peak memory of one run, then timing.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        timed()
        peak_extra = torch.cuda.max_memory_allocated() - before
        peak_total = torch.cuda.max_memory_allocated()
    else:
        before = reset_peak_rss()
        timed()
        peak_total = peak_rss()
        peak_extra = peak_total - before
    timing = time_it(timed, repeat=repeat, warmup=0)
    return {**timing, "peak_extra_bytes": peak_extra, "peak_total_bytes": peak_total, "output_bytes": out_bytes,
            "peak_extra_over_output": round(peak_extra / out_bytes, 3), **(extra or {})}


def run_child(script: Path, *args: str, timeout: float = 1800) -> dict:
    """Runs `python script --child ARGS...`; the child prints one JSON line last."""
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, payload: dict, path: Path | None = None) -> Path:
    """Writes the payload with date and machine to path (default benchmarks/results/<name>.json)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path or RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def bar_chart(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str,
              log: bool = False) -> Path:
    """A grouped bar chart as PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
