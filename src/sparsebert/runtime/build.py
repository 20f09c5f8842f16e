"""Build and load the compiled sparse kernels (``csrc/sparse_kernels.cpp``, shipped as package data).

One place owns the whole path from source to ``ctypes.CDLL``: finding the source, compiling it once per
source, flags, compiler and processor into the cache (``cache_dir()/kernels``), loading it and declaring
the C signatures. ``kernels.py`` and ``int8.py`` only call into the loaded library.

Why failures are loud: the fallback (torch's MKL CSR) is several times slower, so a kernel that stops
compiling must not pass for a machine without a compiler. A compile error is logged at error level with
the compiler's first error lines; ``SPARSEBERT_KERNELS_STRICT=1`` (CI) turns any failure to build or
load into a ``SparseBertError`` and builds with ``-Werror``. Only a machine with no compiler at all
falls back with a single warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sparsebert.errors import SparseBertError
from sparsebert.packaged import cache_dir

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

SOURCE = "csrc/sparse_kernels.cpp"  # inside the sparsebert.runtime package
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wextra"]
STRICT_ENV = "SPARSEBERT_KERNELS_STRICT"
# What the kernels compiled with -march=native should offer, by the /proc/cpuinfo flag that makes the
# compiler define the macro each one tests: the fused attention (the engine's fast path) needs AVX-512F,
# the int8 products AVX512-VNNI, the bf16 ones AVX512-BF16.
EXPECTED = {"attention_supported": "avx512f", "int8_supported": "avx512_vnni", "bf16_supported": "avx512_bf16"}


def strict() -> bool:
    """Whether ``SPARSEBERT_KERNELS_STRICT`` asks for failures to raise instead of falling back."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def source_path() -> Traversable:
    """The shipped C++ source (package data: a plain file in every normal install)."""
    return resources.files("sparsebert.runtime").joinpath(SOURCE)


def cpu_info() -> dict[str, str]:
    """The first processor's ``model name`` and ``flags`` from /proc/cpuinfo (empty where there is none)."""
    path = Path("/proc/cpuinfo")
    info: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags") and key not in info:
            info[key] = value.strip()
    return info


def compiler() -> str | None:
    """``$CXX``, else g++ or c++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build_key(source: str, flags: list[str], cxx: str) -> str:
    """The cached library's key, its file being ``libsparsebert_kernels_<key>.so``: a digest of what the
    build depends on, the source, the flags, the compiler and — since it is built with -march=native — the
    processor's model and instruction-set flags, so a cache shared between machines (a copied home folder,
    an image) never loads code built for another CPU."""
    cpu = cpu_info()
    parts = (source, " ".join(flags), cxx, os.uname().machine, cpu.get("model name", ""), cpu.get("flags", ""))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def first_errors(stderr: str, count: int = 3) -> list[str]:
    """The compiler's first ``count`` error lines (``file:line:col: error: ...``), else its first lines:
    what names the problem, without the include chains and source excerpts around it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines)[:count]


def _fail(message: str, strict_mode: bool) -> None:
    """Raise in strict mode (``message``'s first line: one line for CI), else log at error level."""
    if strict_mode:
        raise SparseBertError(f"{message.splitlines()[0]} ({STRICT_ENV}=1)")
    log.error("%s\nfalling back to torch's CSR kernels (several times slower)", message)


def _compile(cxx: str, source: Path, flags: list[str], target: Path, strict_mode: bool) -> bool:
    """Compile ``source`` into ``target``, atomically (concurrent builders never load a half-written
    file); False (after ``_fail``) when the compiler cannot be run or rejects the source."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            proc = subprocess.run([cxx, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
        except OSError as exc:
            _fail(f"cannot run the C++ compiler {cxx!r}: {exc}", strict_mode)
            return False
        if proc.returncode != 0:
            errors = first_errors(proc.stderr) or [f"exit status {proc.returncode}"]
            _fail(f"the sparse kernels do not compile with {cxx}: " + "\n".join(errors), strict_mode)
            return False
        if proc.stderr.strip():
            log.debug("compiler output for the sparse kernels:\n%s", proc.stderr[-2000:])
        os.replace(out, target)
    return True


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of ``csrc/sparse_kernels.cpp``'s exported functions."""
    i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.spmm_csr_f32.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, c_int]
    lib.spmm_csr_f32.restype = None
    lib.layer_norm_fm_f32.argtypes = [i64, i64, ptr, ptr, ptr, c_float, ptr, ptr, i64, c_int]
    lib.layer_norm_fm_f32.restype = None
    lib.int8_supported.restype = c_int
    lib.attention_supported.restype = c_int
    lib.attention_fm_f32.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, c_float, ptr, c_int]
    lib.attention_fm_f32.restype = None
    lib.bf16_supported.restype = c_int
    if lib.bf16_supported():
        lib.spmm_pairs_bf16.argtypes = [i64, i64, i64, i64, *[ptr] * 8, c_int, i64, c_int]
        lib.to_bf16_fm.argtypes = [i64, i64, i64, ptr, ptr, c_int]
        lib.attention_fm_bf16.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, c_float, ptr, c_int]
    if lib.int8_supported():
        lib.quantize_b4.argtypes = [i64, i64, i64, ptr, ptr, ptr, c_int]
        lib.spmm_b4_i8.argtypes = [i64, i64, i64, *[ptr] * 10, i64, c_int]
    return lib


def build_library(source: Path | None = None, strict_mode: bool | None = None) -> ctypes.CDLL | None:
    """Compile (unless cached) and load the kernels from ``source`` (default: the shipped one); None where
    they cannot be, after one warning (no compiler) or an error-level log (it failed). ``strict_mode``
    (default: ``$SPARSEBERT_KERNELS_STRICT``) raises ``SparseBertError`` instead and adds -Werror."""
    strict_mode = strict() if strict_mode is None else strict_mode
    cxx = compiler()
    if cxx is None:
        if strict_mode:
            raise SparseBertError(f"no C++ compiler found (install g++ or set CXX) ({STRICT_ENV}=1)")
        log.warning("no C++ compiler found: sparse runtime falls back to torch's MKL CSR kernels")
        return None
    flags = [*FLAGS, "-Werror"] if strict_mode else FLAGS
    with ExitStack() as stack:
        path = source or stack.enter_context(resources.as_file(source_path()))
        text = path.read_text()
        target = cache_dir() / "kernels" / f"libsparsebert_kernels_{build_key(text, flags, cxx)}.so"
        if not target.exists() and not _compile(cxx, path, flags, target, strict_mode):
            return None
    import torch  # noqa: F401  (torch's libgomp must be loaded first so the kernels share its pool)

    try:
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, AttributeError) as exc:  # not a loadable library, or one without the symbols above
        _fail(f"cannot load the sparse kernels from {target}: {exc}", strict_mode)
        return None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (the int8 ones too, used from ``int8.py``): built once per source, flags and
    processor, then loaded; None if they cannot be built, or if ``SPARSEBERT_NO_CPP`` is set."""
    if os.environ.get("SPARSEBERT_NO_CPP"):
        return None
    return build_library()


def check_fast_path() -> str:
    """A one-line account of the compiled kernels on this machine; raises ``SparseBertError`` where the
    processor has what a kernel needs (``EXPECTED``) but the build does not offer it: the silent slow
    path that CI must catch. Run it under ``SPARSEBERT_KERNELS_STRICT=1`` so a compile error raises too."""
    lib = library()
    cpu_flags = set(cpu_info().get("flags", "").split())
    wanted = [kernel for kernel, flag in EXPECTED.items() if flag in cpu_flags]
    missing = wanted if lib is None else [kernel for kernel in wanted if not getattr(lib, kernel)()]
    if missing:
        has = ", ".join(EXPECTED[kernel] for kernel in missing)
        why = "SPARSEBERT_NO_CPP is set or no compiler" if lib is None else f"{compiler()} built them without it"
        raise SparseBertError(f"the CPU has {has} but the compiled kernels lack {', '.join(missing)} ({why})")
    if lib is None:
        return "compiled kernels unavailable; none expected on a CPU without AVX-512"
    offered = [kernel.removesuffix("_supported") for kernel in EXPECTED if getattr(lib, kernel)()]
    return f"compiled kernels loaded ({compiler()}): spmm_csr, layer_norm_fm" + "".join(f", {k}" for k in offered)
