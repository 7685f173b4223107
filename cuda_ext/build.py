"""Just-in-time build (ninja) and loading of the compiled kernels, one extension per operator family and device.

Families (`FAMILIES`): `adaptive_conv` (FeatUp's JBU) and `window_attention` (AnyUp's windowed cross-attention).
`python -m cuda_ext.build` builds them all ahead of time; otherwise the first call of a family on a device builds
and caches it (under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). A failed build never raises here:
the caller gets the reason and falls back to that family's pure-PyTorch kernels.
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


@dataclass(frozen=True)
class Family:
    """One operator family's kernel sources: each (family, device type) pair is its own extension module."""

    name: str
    cpu_sources: tuple[Path, ...]
    cuda_sources: tuple[Path, ...]
    cflags: tuple[str, ...] = ()  # extra host-compiler flags


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("adaptive_conv", (CSRC / "adaptive_conv_cpu.cpp",), (CSRC / "adaptive_conv_cuda.cu",)),
        # Its tiles are written as multiply-adds: let the compiler fuse them (ISO C++ mode, as torch builds, would not).
        Family("window_attention", (CSRC / "window_attention_cpu.cpp",), (CSRC / "window_attention_cuda.cu",),
               ("-ffp-contract=fast",)),
    )
}
# GPU architectures when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (A100, A10/3090, H100; PTX for newer).
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"


@dataclass
class BuildResult:
    """A loaded extension module, or the reason it could not be had."""

    module: ModuleType | None
    reason: str = ""


_lock = threading.Lock()
_cache: dict[tuple[str, str], BuildResult] = {}


def _cpu_isa_flags() -> list[str]:
    """Vector ISA flags this CPU supports; explicit (not -march=native) so a shared cache stays safe."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []
    return [f"-m{f}" for f in ("avx2", "fma", "f16c") if f in flags]


def _verbose() -> bool:
    return os.environ.get("FEATUP_BUILD_VERBOSE", "0") == "1"


def _load(name: str, sources: tuple[Path, ...], cuda: bool, extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    _resolve_cuda_home()
    if not _verbose():  # its import warns "No CUDA runtime is found" on every GPU-less machine
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    cflags = ["-O3", *(_cpu_isa_flags()), *extra_cflags]  # the C++ standard is the one torch asks for
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


def load(family: str, device_type: str) -> BuildResult:
    """The compiled kernels of `family` ("adaptive_conv", ...) for device_type "cpu" or "cuda" (built on first
    call; CUDA only where a CUDA toolkit exists)."""
    fam = FAMILIES[family]
    if device_type == "cpu":
        return _load_cached(family, "cpu", lambda: _load(f"featup_{family}_cpu", fam.cpu_sources, False, fam.cflags))
    if device_type != "cuda":
        raise ValueError(f"no compiled kernels for device type {device_type!r}: expected 'cpu' or 'cuda'")

    def build() -> ModuleType:
        problem = _cuda_build_problem()
        if problem:
            raise RuntimeError(problem)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        return _load(f"featup_{family}_cuda", fam.cuda_sources, True, fam.cflags)

    return _load_cached(family, "cuda", build)


def _load_cached(family: str, kind: str, build) -> BuildResult:
    key = (family, kind)
    with _lock:
        if key not in _cache:
            # FEATUP_DISABLE_EXTENSION: 1/all, a device type (cpu, cuda), or a family name disables those builds.
            if os.environ.get("FEATUP_DISABLE_EXTENSION", "") in ("1", "all", kind, family):
                _cache[key] = BuildResult(None, "disabled by FEATUP_DISABLE_EXTENSION")
            else:
                try:
                    _cache[key] = BuildResult(build())
                except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the fallback"
                    first = str(exc).strip().splitlines()
                    _cache[key] = BuildResult(None, f"{type(exc).__name__}: {first[-1] if first else exc}")
        return _cache[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuda_ext.build", description=__doc__)
    parser.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                        help="build the CUDA kernels: auto = where a GPU, nvcc and a CUDA PyTorch exist; "
                             "yes = compile even without a GPU (a compile check)")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append",
                        help="build only this operator family (repeatable; default: all)")
    args = parser.parse_args(argv)
    import torch

    want_cuda = args.cuda == "yes" or (args.cuda == "auto" and torch.cuda.is_available()
                                       and _cuda_build_problem() is None)
    ok = True
    for family in args.family or list(FAMILIES):
        cpu = load(family, "cpu")
        print(f"{family} cpu : {'built ' + cpu.module.__file__ if cpu.module else 'FAILED: ' + cpu.reason}")
        ok &= cpu.module is not None
        if want_cuda:
            cu = load(family, "cuda")
            print(f"{family} cuda: {'built ' + cu.module.__file__ if cu.module else 'FAILED: ' + cu.reason}")
            ok &= cu.module is not None
        else:
            why = (_cuda_build_problem() or "no GPU here") if args.cuda == "auto" else "not requested"
            print(f"{family} cuda: skipped ({why})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
