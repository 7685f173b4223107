"""Just-in-time build (ninja) and loading of the compiled adaptive-conv kernels.

`python -m cuda_ext.build` builds ahead of time; otherwise the first call on a device builds and caches
(under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). A failed build never raises here: the
caller gets the reason and falls back to the pure-PyTorch kernels.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = [CSRC / "adaptive_conv_cpu.cpp"]
CUDA_SOURCES = [CSRC / "adaptive_conv_cuda.cu"]
# GPU architectures when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (A100, A10/3090, H100; PTX for newer).
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"


@dataclass
class BuildResult:
    """A loaded extension module, or the reason it could not be had."""

    module: ModuleType | None
    reason: str = ""


_lock = threading.Lock()
_cache: dict[str, BuildResult] = {}


def _cpu_isa_flags() -> list[str]:
    """Vector ISA flags this CPU supports; explicit (not -march=native) so a shared cache stays safe."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []
    return [f"-m{f}" for f in ("avx2", "fma", "f16c") if f in flags]


def _verbose() -> bool:
    return os.environ.get("FEATUP_BUILD_VERBOSE", "0") == "1"


def _load(name: str, sources: list[Path], cuda: bool) -> ModuleType:
    _resolve_cuda_home()
    if not _verbose():  # its import warns "No CUDA runtime is found" on every GPU-less machine
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    cflags = ["-O3", *(_cpu_isa_flags())]  # the C++ standard is the one torch asks for
    kwargs: dict = dict(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_include_paths=[str(CSRC)],
        verbose=_verbose(),
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", *(f"-isystem={d}" for d in _cuda_library_headers())]
    return cpp_extension.load(**kwargs)


def _resolve_cuda_home() -> None:
    """Point torch at the CUDA toolkit root (its guess from `which nvcc` can be a symlink's folder).

    Must run before torch.utils.cpp_extension is imported, which reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ("/usr/local/cuda", "/opt/cuda"):
        if Path(root, "bin", "nvcc").exists():
            os.environ["CUDA_HOME"] = root
            module = sys.modules.get("torch.utils.cpp_extension")
            if module is not None:
                module.CUDA_HOME = root
            return


def _cuda_library_headers() -> list[str]:
    """Header folders of the CUDA libraries PyTorch's headers include (cuSPARSE, cuBLAS, ...) when the
    toolkit lacks them: the pip `nvidia-*` wheels that come with PyTorch carry them. Searched after the
    toolkit's own headers."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    if home and Path(home, "include", "cusparse.h").exists():
        return []
    try:
        import nvidia  # namespace package of the pip CUDA wheels
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += sorted({str(h.parent) for h in Path(root).glob("*/include/cusparse.h")})
    return found


def _cuda_build_problem() -> str | None:
    """Why a CUDA build cannot be attempted here, or None."""
    _resolve_cuda_home()
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None:
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    return None


def load_cpu() -> BuildResult:
    """The compiled CPU kernels (built on first call)."""
    return _load_cached("cpu", lambda: _load("featup_adaptive_conv_cpu", CPU_SOURCES, cuda=False))


def load_cuda() -> BuildResult:
    """The compiled CUDA kernels (built on first call, only where a CUDA toolkit exists)."""

    def build() -> ModuleType:
        problem = _cuda_build_problem()
        if problem:
            raise RuntimeError(problem)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        return _load("featup_adaptive_conv_cuda", CUDA_SOURCES, cuda=True)

    return _load_cached("cuda", build)


def _load_cached(kind: str, build) -> BuildResult:
    with _lock:
        if kind not in _cache:
            if os.environ.get("FEATUP_DISABLE_EXTENSION", "") in ("1", kind, "all"):
                _cache[kind] = BuildResult(None, "disabled by FEATUP_DISABLE_EXTENSION")
            else:
                try:
                    _cache[kind] = BuildResult(build())
                except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the fallback"
                    first = str(exc).strip().splitlines()
                    _cache[kind] = BuildResult(None, f"{type(exc).__name__}: {first[-1] if first else exc}")
        return _cache[kind]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuda_ext.build", description=__doc__)
    parser.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                        help="build the CUDA kernels: auto = where a GPU, nvcc and a CUDA PyTorch exist; "
                             "yes = compile even without a GPU (a compile check)")
    args = parser.parse_args(argv)
    ok = True
    cpu = load_cpu()
    print(f"cpu : {'built ' + cpu.module.__file__ if cpu.module else 'FAILED: ' + cpu.reason}")
    ok &= cpu.module is not None
    import torch

    want_cuda = args.cuda == "yes" or (args.cuda == "auto" and torch.cuda.is_available()
                                       and _cuda_build_problem() is None)
    if want_cuda:
        cu = load_cuda()
        print(f"cuda: {'built ' + cu.module.__file__ if cu.module else 'FAILED: ' + cu.reason}")
        ok &= cu.module is not None
    else:
        print(f"cuda: skipped ({_cuda_build_problem() or 'no GPU here' if args.cuda == 'auto' else 'not requested'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
