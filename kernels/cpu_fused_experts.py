"""The CPU's fused experts: the whole FFN-expert layer in one C call, built on first use.

`cpu_fused_experts.c`, beside this module, groups the slots by expert and runs each
expert's rows (gather, gate/up GEMM, weighted SwiGLU, down GEMM) in buffers that stay in
one core's cache, then sums each row's slots: one call instead of a dozen passes over
memory. Its GEMMs are MKL's sgemm from torch's own CPU library, and its threads are the
OpenMP threads torch uses (it links the same libgomp).

It is compiled once per source, compiler and CPU with the system C compiler (`$CC`, else
`cc`) into `$MOEPORT_CACHE_DIR` (default: `~/.cache/moeport`), with glibc's vector expf
(libmvec) where it links, else without. Where torch carries no MKL or there is no C
compiler, `fused_experts()` is None and the experts run on torch's operators; a build
that fails says why in a warning, once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from moeport.backends.mkl_grouped_matmul import torch_cpu_library

SOURCE = Path(__file__).with_name("cpu_fused_experts.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp")
#: Tried in order: with glibc's vector math library, then without it.
VARIANTS = (("-DMOEPORT_VECTOR_EXPF", "-lmvec", "-lm"), ("-lm",))


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


def build(compiler: str | None = None) -> Path | None:
    """The built library's path (compiling it if this source, compiler and CPU have none yet), or None
    where there is no compiler or the build fails (with a warning)."""
    compiler = shutil.which(compiler or os.environ.get("CC") or "cc")
    if compiler is None:
        return None
    text = SOURCE.read_bytes()
    recipe = " ".join([*FLAGS, *(" ".join(variant) for variant in VARIANTS)])
    key = hashlib.sha256(b"\0".join([text, compiler.encode(), recipe.encode(), _cpu_identity().encode()]))
    target = cache_dir() / "kernels" / f"cpu_fused_experts-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            for variant in VARIANTS:
                result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), *variant],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
                warnings.warn(f"building {SOURCE.name} with {compiler} failed, so the CPU experts run on torch's "
                              f"operators: {why}", stacklevel=2)
                return None
            os.replace(built, target)  # atomic: a rank building at the same time finds one whole file or none
    except OSError as exc:
        warnings.warn(f"cannot build {SOURCE.name} in {target.parent}: {exc}; the CPU experts run on torch's operators",
                      stacklevel=2)
        return None
    return target


def _address(library: ctypes.CDLL, name: str) -> int | None:
    """The address of the function `name` in `library`, or None if it exports none."""
    function = getattr(library, name, None)
    return None if function is None else ctypes.cast(function, ctypes.c_void_p).value


class CPUFusedExperts:
    """Calls the built `fused_experts`: float32 CPU tensors, contiguous, the layout of model/moe.py's ExpertFFNs."""

    def __init__(self, library: ctypes.CDLL, sgemm: int, threads_local: int | None) -> None:
        self._function = library.fused_experts
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._function.argtypes = [pointer, pointer, pointer, integer, integer, pointer, pointer, integer, integer,
                                   integer, pointer, pointer, integer, pointer, pointer]
        self._function.restype = integer
        self._sgemm, self._threads_local = sgemm, threads_local

    def __call__(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, results: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [N, H] = for each row of x, the sum over its valid slots (local id >= 0) of weight * expert(row);
        `results` [N * k, H] is scratch."""
        self._check(x, local_ids, weights, gate_up, down, results, out)
        (n, k), (count, hidden, double_inter) = local_ids.shape, gate_up.shape
        failed = self._function(x.data_ptr(), local_ids.data_ptr(), weights.data_ptr(), n, k, gate_up.data_ptr(),
                                down.data_ptr(), count, hidden, double_inter // 2, results.data_ptr(), out.data_ptr(),
                                torch.get_num_threads(), self._sgemm, self._threads_local)
        if failed:
            raise MemoryError("fused_experts could not allocate its per-thread buffers")
        return out

    @staticmethod
    def _check(x, local_ids, weights, gate_up, down, results, out) -> None:
        """What the C function assumes; anything else would read or write out of bounds."""
        tensors = (x, local_ids, weights, gate_up, down, results, out)
        if x.dtype != torch.float32:
            raise NotImplementedError(f"the fused CPU experts take float32, not {x.dtype}")
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            raise ValueError("fused_experts takes contiguous CPU tensors")
        if local_ids.dtype != torch.int64 or any(t.dtype != torch.float32 for t in tensors if t is not local_ids):
            raise ValueError("fused_experts takes int64 expert ids and float32 everything else")
        n, k = local_ids.shape
        count, hidden, double_inter = gate_up.shape
        if x.shape != (n, hidden) or weights.shape != (n, k) or out.shape != (n, hidden):
            raise ValueError(f"rows {tuple(x.shape)}, ids {tuple(local_ids.shape)}, weights {tuple(weights.shape)} "
                             f"and out {tuple(out.shape)} do not match hidden size {hidden}")
        if down.shape != (count, double_inter // 2, hidden) or double_inter % 2:
            raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} are not SwiGLU experts")
        if results.shape != (n * k, hidden):
            raise ValueError(f"results must be [{n * k}, {hidden}], not {tuple(results.shape)}")


@functools.cache
def fused_experts() -> CPUFusedExperts | None:
    """The fused CPU experts, built and loaded on first use; None where they cannot run here."""
    torch_library = torch_cpu_library()
    # sgemm_ is MKL's Fortran interface (every argument by pointer); MKL_Set_Num_Threads_Local its C one (by value)
    sgemm = _address(torch_library, "sgemm_") if torch_library is not None else None
    if sgemm is None:
        return None
    path = build()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:  # e.g. built against a newer OpenMP runtime than the one torch loaded
        warnings.warn(f"cannot load {path}: {exc}; the CPU experts run on torch's operators", stacklevel=2)
        return None
    return CPUFusedExperts(library, sgemm, _address(torch_library, "MKL_Set_Num_Threads_Local"))
