"""ptxas keeps the adaptive-conv kernels' filter taps and sums in registers: no stack frame, no spills.

Compiles cuda_ext/csrc/adaptive_conv_cuda.cu for one architecture (sm_90) with `nvcc -Xptxas -v`, device
code only (no GPU needed), and reads ptxas's resource report for every kernel instantiation.
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path


from .conftest import ROOT, requires_nvcc

CSRC = ROOT / "cuda_ext" / "csrc"
KERNELS = ("forward_kernel", "grad_input_kernel", "grad_filters_kernel")
# Itanium-mangled template arguments of the three dtypes the CUDA entry points dispatch to.
DTYPES = {"f": "float", "N3c104HalfE": "half", "N3c108BFloat16E": "bfloat16"}
TEMPLATED_K = (1, 3, 5, 7, 9, 11)
RUNTIME_K = 0  # the template argument of the runtime-k kernels
KERNEL_NAME = re.compile(rf"\d+({'|'.join(KERNELS)})I({'|'.join(DTYPES)})Li(\d+)E")  # name<dtype, k>
PROPERTIES = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                        r"(\d+) bytes spill loads")


def nvcc_command(out: Path) -> list[str]:
    """nvcc as the extension build calls it (torch's headers and CUDA flags), stopping at the sm_90 cubin."""
    from cuda_ext import build

    build._resolve_cuda_home()
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(device_type="cuda"), sysconfig.get_paths()["include"], str(CSRC)]
    return [
        str(Path(cpp_extension.CUDA_HOME, "bin", "nvcc")),
        "-cubin", "-arch=sm_90", "-std=c++20", "-O3", "-Xptxas", "-v",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *(f"-I{d}" for d in includes),
        *(f"-isystem={d}" for d in build._cuda_library_headers()),
        "-DTORCH_EXTENSION_NAME=featup_adaptive_conv_cuda",
        "-o", str(out), str(CSRC / "adaptive_conv_cuda.cu"),
    ]


def ptxas_report(log: str) -> dict[tuple[str, str, int], tuple[int, int, int]]:
    """(kernel, dtype, k) -> (stack frame, spill stores, spill loads) bytes, from `ptxas -v` output."""
    report = {}
    for mangled, stack, stores, loads in PROPERTIES.findall(log):
        name = KERNEL_NAME.search(mangled)
        if name:
            report[(name.group(1), DTYPES[name.group(2)], int(name.group(3)))] = (int(stack), int(stores), int(loads))
    return report


@requires_nvcc
def test_templated_kernels_have_no_stack_frame(tmp_path):
    proc = subprocess.run(nvcc_command(tmp_path / "adaptive_conv.cubin"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = ptxas_report(proc.stdout + proc.stderr)
    expected = {(kernel, dtype, k) for kernel in KERNELS for dtype in DTYPES.values() for k in (*TEMPLATED_K, RUNTIME_K)}
    assert expected <= report.keys(), f"ptxas reported no figures for {sorted(expected - report.keys())}"
    on_stack = {key: report[key] for key in sorted(expected) if report[key] != (0, 0, 0)}
    assert not on_stack, f"(stack frame, spill stores, spill loads) bytes not zero: {on_stack}"
