"""The CPU's fused experts: the whole FFN-expert layer as one operator, `torch.ops.moeport.fused_experts`.

`cpu_fused_experts.cpp`, beside this module, groups the slots by expert and runs each
expert's rows (gather, gate/up GEMM, weighted SwiGLU, down GEMM) in buffers that stay in
one core's cache, then sums each row's slots: one call instead of a dozen passes over
memory. Its GEMMs are MKL's sgemm from torch's own CPU library, and its threads are the
OpenMP threads torch uses (it links the same libgomp).

The operator is defined here with torch.library, so the profiler names it and
`torch.compile` treats it as one opaque call (its fake gives the shapes). Its CPU
implementation is the C++ file, built on first use by `torch.utils.cpp_extension` (the
system C++ compiler, `$CXX` else `c++`, driven by ninja; concurrent builds wait on a lock
file) into `$MOEPORT_CACHE_DIR` (default: `~/.cache/moeport`), once per source, compiler,
flags, torch version and CPU, with glibc's vector expf (libmvec) where it links, else
without. Where torch's CPU library exports no MKL sgemm, or there is no C++ compiler or
no ninja, `fused_experts()` is None and the experts run on other kernels; a build that
fails says why in a warning, once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import platform
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

from moeport.kernels.mkl_grouped_matmul import torch_cpu_library

SOURCE = Path(__file__).with_name("cpu_fused_experts.cpp")
NAME = "moeport_cpu_fused_experts"
OP = "moeport::fused_experts"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")
#: Tried in order: with glibc's vector math library, then without it (compile flags, link flags).
VARIANTS = ((("-DMOEPORT_VECTOR_EXPF",), ("-lmvec", "-lm")), ((), ("-lm",)))
#: A build takes seconds; a lock file this old was left by one that was killed, and would be waited on forever.
STALE_LOCK_S = 600.0

torch.library.define(
    OP,
    "(Tensor x, Tensor local_ids, Tensor weights, Tensor gate_up, Tensor down, Tensor(a!) results, Tensor(b!) out) -> ()",
)


@torch.library.register_fake(OP)
def _fake(x, local_ids, weights, gate_up, down, results, out) -> None:
    """Shapes only: the operator writes `results` and `out` in place and returns nothing."""


def cache_dir() -> Path:
    """Where built kernels are kept: `$MOEPORT_CACHE_DIR`, else `~/.cache/moeport` (or `$XDG_CACHE_HOME/moeport`)."""
    if os.environ.get("MOEPORT_CACHE_DIR"):
        return Path(os.environ["MOEPORT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeport"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build_directory(compiler: str) -> Path:
    """The folder this source, compiler, torch and CPU build into."""
    recipe = [SOURCE.read_bytes(), compiler.encode(), " ".join([*FLAGS, *map(str, VARIANTS)]).encode(),
              torch.__version__.encode(), _cpu_identity().encode()]
    key = hashlib.sha256(b"\0".join(recipe)).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_fused_experts-{key}"


@contextlib.contextmanager
def _compiler_named(compiler: str) -> Iterator[None]:
    """`compiler` as the C++ compiler cpp_extension uses ($CXX) while the block runs."""
    before = os.environ.get("CXX")
    os.environ["CXX"] = compiler
    try:
        yield
    finally:
        if before is None:
            del os.environ["CXX"]
        else:
            os.environ["CXX"] = before


def _why(exc: BaseException) -> str:
    """The line of a failed build that says what went wrong."""
    text = getattr(exc, "output", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith(("Error building", "FAILED"))]
    return (errors or lines or [type(exc).__name__])[0]


def build(compiler: str | None = None) -> Path | None:
    """Build (where this source, compiler, torch and CPU have no build yet) and load the operator's
    CPU implementation; returns the library's path, or None where there is no C++ compiler or no
    ninja, or the build fails (with a warning saying why)."""
    from torch.utils import cpp_extension

    compiler = shutil.which(compiler or os.environ.get("CXX") or "c++")
    if compiler is None or not cpp_extension.is_ninja_available():
        return None
    directories = [build_directory(compiler) / f"variant-{index}" for index in range(len(VARIANTS))]
    for directory in directories:
        library = directory / f"{NAME}.so"
        if library.exists() and not (directory / "lock").exists():  # built before, and no build in progress
            return _load(library)
    why = ""
    for directory, (cflags, ldflags) in zip(directories, VARIANTS):
        _remove_if_stale(directory / "lock")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with _compiler_named(compiler), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # cpp_extension's notes on compiler versions
                cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=[*FLAGS, *cflags],
                                   extra_ldflags=["-fopenmp", *ldflags], build_directory=str(directory),
                                   is_python_module=False, verbose=False)
            return directory / f"{NAME}.so"
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            why = _why(exc)
    warnings.warn(f"building {SOURCE.name} with {compiler} failed, so the CPU experts run on other kernels: {why}",
                  stacklevel=2)
    return None


def _load(library: Path) -> Path | None:
    """Load a build from before into this process; None (with a warning) where it does not load."""
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:  # e.g. built against a newer OpenMP runtime than the one torch loaded
        warnings.warn(f"cannot load {library}: {exc}; the CPU experts run on other kernels", stacklevel=3)
        return None
    return library


def _remove_if_stale(lock: Path) -> None:
    """Remove a build's lock file that no live build can still hold (see STALE_LOCK_S)."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            warnings.warn(f"removing {lock}, left by a build of {SOURCE.name} that did not finish", stacklevel=3)
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


class CPUFusedExperts:
    """Calls `torch.ops.moeport.fused_experts`: float32 CPU tensors, contiguous, in the experts' layout
    (see moeport.kernels). The operator itself refuses anything else: NotImplementedError for another
    dtype, ValueError for shapes or layouts it would read or write out of bounds."""

    def __init__(self) -> None:
        self._op = torch.ops.moeport.fused_experts.default

    def __call__(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, results: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [N, H] = for each row of x, the sum over its valid slots (local id >= 0) of weight * expert(row);
        `results` [N * k, H] is scratch."""
        self._op(x, local_ids, weights, gate_up, down, results, out)
        return out


@functools.cache
def fused_experts() -> CPUFusedExperts | None:
    """The fused CPU experts, built and loaded on first use; None where they cannot run here."""
    library = torch_cpu_library()
    # sgemm_ is MKL's Fortran interface, which the operator calls; without it there is nothing to build
    if library is None or getattr(library, "sgemm_", None) is None:
        return None
    if build() is None:
        return None
    return CPUFusedExperts()
