"""The CPU's grouped matmul: MKL's group-batched GEMM, from the MKL inside torch's CPU library.

torch's x86 builds link MKL into their CPU library and export its C interface;
`cblas_?gemm_batch` runs many GEMMs of different shapes in one call, spread over
the intra-op threads. `grouped_matmul()` is None where that library or symbol is
missing (builds without MKL), so the experts use torch's operators there.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import itertools
import os
from typing import Sequence

import torch

_ROW_MAJOR, _NO_TRANS = 101, 111


@functools.cache
def torch_cpu_library() -> ctypes.CDLL | None:
    """torch's CPU library (already loaded by `import torch`), or None if it is not where torch keeps it."""
    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*"))):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _batch_gemm(library: ctypes.CDLL | None, name: str) -> ctypes._CFuncPtr | None:
    function = getattr(library, name, None) if library is not None else None
    if function is None:
        return None
    pointer = ctypes.c_void_p
    # layout, transa[], transb[], m[], n[], k[], alpha[], a[], lda[], b[], ldb[], beta[], c[], ldc[], groups, size[]
    function.argtypes = [ctypes.c_int] + [pointer] * 13 + [ctypes.c_int, pointer]
    function.restype = None
    return function


class MKLGroupedMatmul:
    """A grouped matmul over MKL's `cblas_sgemm_batch` / `cblas_dgemm_batch`, one GEMM per non-empty group.

    Takes float32 or float64 CPU tensors whose rows are contiguous (any row stride),
    so a column slice of a wider buffer may be a factor or the result.
    """

    def __init__(self, library: ctypes.CDLL | None) -> None:
        self._functions = {
            torch.float32: (_batch_gemm(library, "cblas_sgemm_batch"), ctypes.c_float),
            torch.float64: (_batch_gemm(library, "cblas_dgemm_batch"), ctypes.c_double),
        }

    def available(self) -> bool:
        """Whether the library exports the float32 batch GEMM."""
        return self._functions[torch.float32][0] is not None

    def __call__(self, a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """out[rows of group g] = a[rows of group g] @ b[g], for consecutive row blocks of `sizes`."""
        function, scalar = self._functions.get(a.dtype, (None, None))
        if function is None:
            raise NotImplementedError(f"no MKL batch GEMM for {a.dtype}")
        self._check(a, b, sizes, out)
        groups = [(g, start, size) for g, start, size in zip(itertools.count(), itertools.accumulate(sizes, initial=0), sizes)
                  if size]
        if not groups:
            return out
        count, item = len(groups), a.element_size()
        ints, scalars, pointers = ctypes.c_int * count, scalar * count, ctypes.c_void_p * count
        k, n = b.shape[1], b.shape[2]
        a_ptr, b_ptr, c_ptr = a.data_ptr(), b.data_ptr(), out.data_ptr()
        lda, ldb, ldc = a.stride(0), b.stride(1), out.stride(0)
        function(
            _ROW_MAJOR, ints(*[_NO_TRANS] * count), ints(*[_NO_TRANS] * count),
            ints(*[size for _, _, size in groups]), ints(*[n] * count), ints(*[k] * count), scalars(*[1.0] * count),
            pointers(*[a_ptr + start * lda * item for _, start, _ in groups]), ints(*[lda] * count),
            pointers(*[b_ptr + g * b.stride(0) * item for g, _, _ in groups]), ints(*[ldb] * count),
            scalars(*[0.0] * count),
            pointers(*[c_ptr + start * ldc * item for _, start, _ in groups]), ints(*[ldc] * count),
            count, ints(*[1] * count),
        )
        return out

    @staticmethod
    def _check(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], out: torch.Tensor) -> None:
        """Shapes, dtypes and layouts the pointers below assume: a wrong one would read or write out of bounds."""
        if a.dim() != 2 or b.dim() != 3 or out.dim() != 2:
            raise ValueError(f"expected a [S, K], b [G, K, N], out [S, N]; got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(out.shape)}")
        if b.shape[0] != len(sizes) or sum(sizes) != a.shape[0] or min(sizes, default=0) < 0:
            raise ValueError(f"sizes {list(sizes)} do not split {a.shape[0]} rows into {b.shape[0]} groups")
        if a.shape[1] != b.shape[1] or out.shape != (a.shape[0], b.shape[2]):
            raise ValueError(f"cannot multiply {tuple(a.shape)} by {tuple(b.shape)} into {tuple(out.shape)}")
        if b.dtype != a.dtype or out.dtype != a.dtype or any(t.device.type != "cpu" for t in (a, b, out)):
            raise ValueError("a, b and out must be CPU tensors of one dtype")
        if (a.shape[0] and a.stride(1) != 1) or b.stride(2) != 1 or (out.shape[0] and out.stride(1) != 1):
            raise ValueError("rows of a, b and out must be contiguous")
        if a.stride(0) < a.shape[1] or b.stride(1) < b.shape[2] or out.stride(0) < out.shape[1]:
            raise ValueError("rows must not overlap")


@functools.cache
def grouped_matmul() -> MKLGroupedMatmul | None:
    """MKL's grouped matmul, or None on a torch build without MKL's batch GEMM."""
    kernel = MKLGroupedMatmul(torch_cpu_library())
    return kernel if kernel.available() else None
