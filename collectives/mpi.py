"""Communicator over MPI (mpi4py), with one communication thread per process.

Every MPI call of the process runs on one thread that the world communicator owns
(mpi_thread.py says why): a primitive queues a job and returns a Handle backed by a
future, and the thread makes the blocking MPI call while the caller computes.

How tensors travel:
- CPU tensors travel zero-copy, as numpy views of the tensor's memory.
- Data that is only moved (all_gather, all_to_all, broadcast, send/recv)
  travels as a same-size integer view (bfloat16 and float16 as int16, ...), so
  every dtype moves bit-exactly whether or not numpy or MPI know it.
- Reductions use the real dtype where MPI reduces it; bfloat16 and float16 (and
  other floating types MPI lacks) are staged through float32 for the reduction
  and the result is written back (rounded once, at the end); bool and other
  integer types MPI lacks are staged through int64. AVG is a SUM divided by the
  group size (floor division for integers, as the base class's fallback does).
- Device (non-CPU) and non-contiguous tensors are copied to contiguous host
  memory when the operation is issued, and the result is copied back on
  `wait()`, in the caller's thread and stream.

MPI is initialised with thread support (`mpi4py.rc.thread_level`, set before
`mpi4py.MPI` is first imported); at least MPI_THREAD_SERIALIZED is required.
A timed-out `wait()` raises TimeoutError naming the operation, but the blocking
call stays on the thread: later operations queue behind it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import sys
from typing import Any, Callable, Iterable, Sequence

import torch

from moeport.base.errors import UserError
from moeport.collectives.base import Communicator, Handle, ReduceOp
from moeport.collectives.mpi_thread import CommThread, InFlight

log = logging.getLogger("moeport.collectives")

#: Thread support requested when moeport is the first to initialise MPI (mpi4py's own default).
THREAD_LEVEL = "multiple"
#: How long `close()` waits for the communication thread to finish what was queued before it.
CLOSE_GRACE_S = 10.0
_P2P_TAG = 0

# Integer types of each size: how moved data travels (bit-exact for every dtype).
_WIRE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
# Types MPI reduces natively through their numpy view.
_REDUCE_NATIVE = frozenset({
    torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
    torch.complex64, torch.complex128,
})


_checked_mpi: Any = None


def _mpi() -> Any:
    """The mpi4py.MPI module; initialises MPI (in this thread) with the thread support the comm thread needs."""
    global _checked_mpi
    if _checked_mpi is not None:
        return _checked_mpi
    if "mpi4py.MPI" not in sys.modules:
        try:
            import mpi4py
        except ImportError:
            raise UserError(
                "collectives.library: mpi needs mpi4py and an MPI library: pip install 'moeport[mpi]'"
            ) from None
        mpi4py.rc.thread_level = THREAD_LEVEL
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise UserError(
            "MPI was initialised without thread support (MPI_THREAD_SERIALIZED or better is needed for moeport's "
            "communication thread); do not set mpi4py.rc.thread_level below 'serialized'"
        )
    _checked_mpi = MPI
    return MPI


# -- tensors as MPI buffers ------------------------------------------------------------------------


def _numpy(tensor: torch.Tensor) -> Any:
    """A flat numpy view of contiguous CPU `tensor`'s memory, in its own dtype."""
    return tensor.detach().reshape(-1).numpy()


def _wire(tensor: torch.Tensor) -> Any:
    """A flat numpy view of contiguous CPU `tensor` as same-size integers: moves any dtype bit-exactly."""
    flat = tensor.detach().reshape(-1)
    return flat.view(_WIRE_INT[tensor.element_size()]).numpy()


def _wire_per_row(tensor: torch.Tensor) -> int:
    """Elements of `_wire(tensor)` in one row (dim 0) of `tensor`."""
    row = 1
    for size in tensor.shape[1:]:
        row *= size
    return row * tensor.element_size() // _WIRE_INT[tensor.element_size()].itemsize


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reduction of `dtype` runs in: itself where MPI reduces it, else float32 / complex64 / int64."""
    if dtype in _REDUCE_NATIVE:
        return dtype
    if dtype.is_floating_point:
        return torch.float32
    if dtype.is_complex:
        return torch.complex64
    return torch.int64


def _average(tensor: torch.Tensor, size: int) -> None:
    """Divide a sum by the group size, in place (floor division for integers)."""
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.div_(size)
    else:
        tensor.floor_divide_(size)


class _Host:
    """Contiguous CPU memory for a tensor: the tensor itself, or a staging copy written back on wait()."""

    def __init__(self, tensor: torch.Tensor, read: bool = True) -> None:
        self.tensor = tensor
        self.staged = tensor.device.type != "cpu" or not tensor.is_contiguous()
        if not self.staged:
            self.buffer = tensor
        elif read:
            self.buffer = tensor.detach().to("cpu").contiguous()
        else:
            self.buffer = torch.empty(tensor.shape, dtype=tensor.dtype)

    def write_back(self) -> None:
        """Copy the staged result into the tensor (in the caller's thread and stream)."""
        if self.staged:
            self.tensor.copy_(self.buffer)


class MPIHandle(Handle):
    """An MPI operation queued on the communication thread; `wait()` returns `result`."""

    def __init__(
        self, engine: CommThread, future: concurrent.futures.Future, op: str, result: Any,
        outputs: Sequence[_Host] = (),
    ) -> None:
        self._engine = engine
        self._future = future
        self._op = op
        self._result = result
        self._outputs = list(outputs)

    def wait(self, timeout: float | None = None) -> Any:
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._engine.timeout_error(self._op, timeout) from None
        except Exception as exc:
            raise RuntimeError(f"MPI {self._op} failed: {exc}") from exc
        while self._outputs:
            self._outputs.pop().write_back()
        return self._result

    def is_completed(self) -> bool:
        return self._future.done()


# -- the communicator ------------------------------------------------------------------------------

_MPI_OPS = {ReduceOp.SUM: "SUM", ReduceOp.AVG: "SUM", ReduceOp.MAX: "MAX", ReduceOp.MIN: "MIN"}


class MPICommunicator(Communicator):
    """An MPI communicator (mpi4py) as a Communicator.

    Build the world one with `MPICommunicator.world()` in each rank started by
    mpiexec (the Runtime does, for profiles with `collectives.library: mpi`);
    subgroups come from `new_group`. Every primitive queues its MPI call on the
    process's communication thread and returns at once; the base class waits
    for the synchronous calls.
    """

    def __init__(
        self, comm: Any, global_ranks: Sequence[int] | None, engine: CommThread, timeout_s: float = 60.0,
        force_fallbacks: Iterable[str] = (), is_world: bool = False,
    ) -> None:
        rank, size = engine.call(lambda: (comm.Get_rank(), comm.Get_size()), "Comm_rank", timeout_s)
        members = range(size) if global_ranks is None else global_ranks
        super().__init__(rank, size, members, timeout_s, force_fallbacks)
        self._comm = comm
        self._is_world = is_world
        self._engine = engine
        self._mpi = _mpi()

    @classmethod
    def world(cls, timeout_s: float = 60.0, force_fallbacks: Iterable[str] = ()) -> "MPICommunicator":
        """The communicator of every rank mpiexec started (a duplicate of MPI_COMM_WORLD, private to moeport).

        It starts the process's communication thread, which its subgroups share, and ends it on
        `close()` (or at exit, before mpi4py finalises MPI, if it was never closed).
        """
        MPI = _mpi()
        engine = CommThread()
        try:
            comm = engine.call(MPI.COMM_WORLD.Dup, "Comm_dup", timeout_s)
            world = cls(comm, None, engine, timeout_s, force_fallbacks, is_world=True)
        except BaseException:
            engine.stop(0.0)
            raise
        atexit.register(world._stop_thread)  # registered after mpi4py's hook, so it runs first
        return world

    @property
    def library(self) -> str:
        return "mpi"

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        members = sorted(set(ranks))
        if len(members) != len(list(ranks)) or any(r < 0 or r >= self.world_size for r in members):
            raise ValueError(
                f"new_group ranks must be distinct ranks of this group (0..{self.world_size - 1}), got {list(ranks)}"
            )
        if self.rank not in members:
            return None

        def create() -> Any:  # collective over the members only (MPI_Comm_create_group)
            parent = self._comm.Get_group()
            group = parent.Incl(members)
            try:
                return self._comm.Create_group(group)
            finally:
                group.Free()
                parent.Free()

        comm = self._engine.call(create, "Comm_create_group", self.timeout_s)
        members_world = [self.global_ranks[r] for r in members]
        return MPICommunicator(comm, members_world, self._engine, self.timeout_s, self.forced_fallbacks)

    def close(self) -> None:
        """On the world communicator: finish the queued operations and end the communication thread.

        MPI itself is finalised by mpi4py when the process exits. Subgroup communicators share the
        world's thread and end only their own workers.
        """
        super().close()
        if self._is_world:
            atexit.unregister(self._stop_thread)
            self._stop_thread()

    def _stop_thread(self) -> None:
        """End the communication thread, so that no MPI call is in flight when MPI is finalised."""
        grace = min(self.timeout_s, CLOSE_GRACE_S)
        if not self._engine.stop(grace):
            log.warning("the MPI communication thread is still inside an MPI call after %g s; leaving it", grace)

    # -- the primitives ---------------------------------------------------------------------
    def _submit(self, op: str, job: Callable[[], Any], result: Any, outputs: Sequence[_Host] = ()) -> Handle:
        return MPIHandle(self._engine, self._engine.submit(job, op), op, result, outputs)

    def _op(self, op: ReduceOp) -> Any:
        return getattr(self._mpi, _MPI_OPS[op])

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> Handle:
        host = _Host(tensor)

        def job() -> None:
            buffer = host.buffer
            work = buffer if _reduce_dtype(buffer.dtype) == buffer.dtype else buffer.to(_reduce_dtype(buffer.dtype))
            self._comm.Allreduce(self._mpi.IN_PLACE, _numpy(work), op=self._op(op))
            if op is ReduceOp.AVG:
                _average(work, self.world_size)
            if work is not buffer:
                buffer.copy_(work)

        return self._submit("all_reduce", job, tensor, [host])

    def _all_gather(self, tensor: torch.Tensor, output: torch.Tensor) -> Handle:
        send, recv = _Host(tensor), _Host(output, read=False)
        return self._submit(
            "all_gather", lambda: self._comm.Allgather(_wire(send.buffer), _wire(recv.buffer)), output, [recv]
        )

    def _reduce_scatter(self, tensor: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> Handle:
        send, recv = _Host(tensor), _Host(output, read=False)

        def job() -> None:
            dtype = _reduce_dtype(tensor.dtype)
            work_in = send.buffer.to(dtype)
            work_out = recv.buffer if dtype == recv.buffer.dtype else torch.empty(recv.buffer.shape, dtype=dtype)
            self._comm.Reduce_scatter_block(_numpy(work_in), _numpy(work_out), op=self._op(op))
            if op is ReduceOp.AVG:
                _average(work_out, self.world_size)
            if work_out is not recv.buffer:
                recv.buffer.copy_(work_out)

        return self._submit("reduce_scatter", job, output, [recv])

    def _all_to_all(self, tensor, output, input_splits, output_splits) -> Handle:
        send, recv = _Host(tensor), _Host(output, read=False)
        send_spec = _counts(input_splits, _wire_per_row(tensor))
        recv_spec = _counts(output_splits, _wire_per_row(output))

        def job() -> None:
            self._comm.Alltoallv([_wire(send.buffer), send_spec], [_wire(recv.buffer), recv_spec])

        return self._submit("all_to_all", job, output, [recv])

    def _broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        host = _Host(tensor)
        return self._submit("broadcast", lambda: self._comm.Bcast(_wire(host.buffer), root=src), tensor, [host])

    def _barrier(self) -> Handle:
        return self._submit("barrier", self._comm.Barrier, None)

    def _send(self, tensor: torch.Tensor, dst: int) -> Handle:
        host = _Host(tensor)

        def job() -> InFlight:
            buffer = _wire(host.buffer)
            return InFlight(self._comm.Isend(buffer, dest=dst, tag=_P2P_TAG), None, buffer, f"send to {dst}")

        return self._submit("send", job, None)

    def _recv(self, tensor: torch.Tensor, src: int) -> Handle:
        host = _Host(tensor, read=False)

        def job() -> InFlight:
            buffer = _wire(host.buffer)
            return InFlight(self._comm.Irecv(buffer, source=src, tag=_P2P_TAG), None, buffer, f"recv from {src}")

        return self._submit("recv", job, tensor, [host])


def _counts(splits: Sequence[int], per_row: int) -> tuple[list[int], list[int]]:
    """(counts, displacements) in wire elements for row splits of `per_row` elements each."""
    counts = [rows * per_row for rows in splits]
    displacements = [0] * len(counts)
    for i in range(1, len(counts)):
        displacements[i] = displacements[i - 1] + counts[i - 1]
    return counts, displacements
