"""The conformance suite: every Backend and Communicator operation checked against a local reference.

Each rank builds every rank's rank-tagged, small-integer-valued input itself, so
the expected result of each collective is known exactly without trusting the
library under test. A cell of the matrix (operation x dtype) is:

- pass:        the native operation gave the exact answer;
- fallback:    a declared fallback served it and gave the exact answer;
- unsupported: the backend does not claim the dtype, the operation does not apply to it, or
               the device offers no kernel of that kind for it (the experts' kernels are optional);
- FAIL:        a wrong answer or an error (the suite then exits 1); where a declared gap of the
               library would serve the operation by a fallback instead, the cell says which.

Each cell has its own short deadline (CELL_TIMEOUT_S for a collective, ASYNC_REPORT_S for an
async one to report completion by itself), so a failing cell costs seconds, not the profile's
collective timeout; an async operation that never reports completion is still waited for, so
the ranks stay in step for the cells after it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from moeport.base.dtypes import MODEL_DTYPES
from moeport.collectives.base import Communicator, ReduceOp
from moeport.conformance_matrix import failed, format_matrix, merge, report, to_json
from moeport.kernels import KINDS
from moeport.kernels.checks import verify
from moeport.runtime import Runtime

#: The model's dtypes, and an integer one (the collectives also move ids and counts).
DTYPES = (*MODEL_DTYPES, "int64")
NO_DTYPE = "-"
#: A collective's deadline inside the suite (the profile's timeout, if shorter), and how long an async one
#: may take to report completion by itself, in seconds.
CELL_TIMEOUT_S = 10.0
ASYNC_REPORT_S = 2.0
# (operation, dtype) pairs that have no meaning: an average of integers, integer hidden states.
NOT_APPLICABLE = {("all_reduce.avg", "int64"), ("dispatch_combine", "int64")} | {
    (f"experts.{kind}", "int64") for kind in KINDS}


class NotOffered(Exception):
    """Raised by a check of something optional the device does not offer: its cell is "unsupported"."""


class NeverReported(AssertionError):
    """An async operation did not report completion by itself; `gap` is the fallback that would serve it."""

    def __init__(self, op: str, gap: str) -> None:
        super().__init__(f"async {op} never reported completion within {ASYNC_REPORT_S:g} s (it completed when "
                         "waited for)")
        self.gap = gap


@dataclasses.dataclass
class Cell:
    """The outcome of one operation for one dtype."""

    status: str
    detail: str = ""


def rank_data(rank: int, rows: int, width: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Rank-tagged small integers (exact in every dtype): what `rank` contributes to a check."""
    base = torch.arange(rows * width, dtype=torch.int64).reshape(rows, width)
    return ((base * 5 + salt) % 11 + 3 * rank + 1).to(dtype)


def _expect(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{what}: got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}")
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        first = tuple(bad[0].tolist()) if len(bad) else ()
        raise AssertionError(f"{what}: {len(bad)} wrong values, first at {first}: {got[first]} != {want[first]}")


class Suite:
    """The checks, run on one rank; each returns None (pass) or raises."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.comm: Communicator = rt.comm
        self.rank, self.world = self.comm.rank, self.comm.world_size
        self.device = rt.device

    def data(self, rank: int, rows: int, dtype: torch.dtype, width: int = 5, salt: int = 0) -> torch.Tensor:
        return rank_data(rank, rows, width, dtype, salt).to(self.device)

    # -- collectives ----------------------------------------------------------
    def all_reduce(self, dtype: torch.dtype, op: ReduceOp) -> None:
        inputs = [self.data(r, 4, dtype, salt=1) for r in range(self.world)]
        stacked = torch.stack([t.to(torch.float64) for t in inputs])
        reference = {
            ReduceOp.SUM: stacked.sum(0), ReduceOp.AVG: stacked.sum(0) / self.world,
            ReduceOp.MAX: stacked.max(0).values, ReduceOp.MIN: stacked.min(0).values,
        }[op]
        got = self.comm.all_reduce(inputs[self.rank].clone(), op)
        if op is ReduceOp.AVG:
            torch.testing.assert_close(got.to(torch.float64), reference, rtol=1e-2, atol=1e-2)
        else:
            _expect(got, reference.to(dtype), f"all_reduce({op.value})")

    def all_gather(self, dtype: torch.dtype) -> None:
        want = torch.cat([self.data(r, 3, dtype) for r in range(self.world)])
        _expect(self.comm.all_gather(self.data(self.rank, 3, dtype)), want, "all_gather")

    def reduce_scatter(self, dtype: torch.dtype) -> None:
        rows = 2
        full = sum(self.data(r, rows * self.world, dtype, salt=2).to(torch.float64) for r in range(self.world))
        want = full[self.rank * rows:(self.rank + 1) * rows].to(dtype)
        _expect(self.comm.reduce_scatter(self.data(self.rank, rows * self.world, dtype, salt=2)), want, "reduce_scatter")

    def _a2a_splits(self, src: int, dst: int, kind: str) -> int:
        if kind == "equal":
            return 2
        if kind == "empty":
            return 0
        return (3 * src + dst) % 4  # uneven, with zero-size splits for some pairs

    def _a2a_case(self, dtype: torch.dtype, kind: str) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
        """(rows this rank sends, input splits, output splits, rows it must receive) of an all_to_all of `kind`."""
        w = self.world
        sends = [[self.data(src, self._a2a_splits(src, dst, kind), dtype, salt=dst) for dst in range(w)] for src in range(w)]
        ins = [self._a2a_splits(self.rank, d, kind) for d in range(w)]
        outs = [self._a2a_splits(s, self.rank, kind) for s in range(w)]
        return torch.cat(sends[self.rank]), ins, outs, torch.cat([sends[src][self.rank] for src in range(w)])

    def all_to_all(self, dtype: torch.dtype, kind: str, async_op: bool = False) -> None:
        mine, ins, outs, want = self._a2a_case(dtype, kind)
        result = self.comm.all_to_all(mine, input_splits=ins, output_splits=outs, async_op=async_op)
        got = self._finish_async(result, async_op, "all_to_all")
        _expect(got, want, f"all_to_all({kind})")

    def all_to_all_with_counts(self, dtype: torch.dtype) -> None:
        """Uneven splits that only the senders know, synchronous, then async into a buffer the caller hands out."""
        mine, ins, outs, want = self._a2a_case(dtype, "uneven")
        got, splits = self.comm.all_to_all_with_counts(mine, ins)
        buffer = torch.full((want.shape[0] + 3, want.shape[1]), -1, dtype=dtype, device=self.device)
        handle = self.comm.all_to_all_with_counts(mine, ins, lambda rows: buffer[:rows], async_op=True)
        got_async, splits_async = self._finish_async(handle, True, "all_to_all_with_counts")
        _expect(got, want, "all_to_all_with_counts")
        _expect(got_async, want, "async all_to_all_with_counts")
        if splits != outs or splits_async != outs or got_async.data_ptr() != buffer.data_ptr():
            raise AssertionError(f"all_to_all_with_counts: splits {splits} / {splits_async}, expected {outs}, or "
                                 "the rows did not arrive in the buffer given")

    def broadcast(self, dtype: torch.dtype) -> None:
        src = self.world - 1
        tensor = self.data(self.rank, 3, dtype)
        _expect(self.comm.broadcast(tensor, src=src), self.data(src, 3, dtype), "broadcast")

    def send_recv(self, dtype: torch.dtype) -> None:
        if self.world == 1:
            return
        right, left = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        # Even ranks send first, odd ranks receive first: no cycle of blocked sends, even
        # where a library (or the async fallback) makes send block until it is received.
        outgoing = self.data(self.rank, 3, dtype, salt=right)
        incoming = torch.empty(3, 5, dtype=dtype, device=self.device)
        if self.rank % 2 == 0:
            self.comm.send(outgoing, right)
            got = self.comm.recv(incoming, left)
        else:
            got = self.comm.recv(incoming, left)
            self.comm.send(outgoing, right)
        _expect(got, self.data(left, 3, dtype, salt=self.rank), "recv")

    def barrier(self) -> None:
        self.comm.barrier()
        self.comm.barrier(async_op=True).wait(self.comm.timeout_s)

    def _finish_async(self, result: Any, async_op: bool, what: str) -> torch.Tensor:
        """The result of an op; an async one must report completion by itself within ASYNC_REPORT_S
        (else NeverReported, raised only after waiting for it, so the ranks stay in step)."""
        if not async_op:
            return result
        got, late = self._finish(result, what)
        if late is not None:
            raise late
        return got

    def _finish(self, handle: Any, what: str) -> tuple[Any, NeverReported | None]:
        """Wait for an async op: (its result, NeverReported if it did not report completion by itself in time)."""
        deadline = time.monotonic() + ASYNC_REPORT_S
        while not handle.is_completed() and time.monotonic() < deadline:
            time.sleep(0.001)
        late = None if handle.is_completed() else NeverReported(what, "reduce_scatter" if what == "reduce_scatter"
                                                                 else "async")
        return handle.wait(self.comm.timeout_s), late

    def async_ops(self, dtype: torch.dtype) -> None:
        """all_reduce, all_gather and reduce_scatter issued together, completed out of order (each waited for
        before any is judged, so a failing one leaves none in flight)."""
        reduce_in = self.data(self.rank, 4, dtype, salt=3)
        h_reduce = self.comm.all_reduce(reduce_in, async_op=True)
        h_gather = self.comm.all_gather(self.data(self.rank, 2, dtype), async_op=True)
        h_scatter = self.comm.reduce_scatter(self.data(self.rank, 2 * self.world, dtype), async_op=True)
        (gathered, late_gather), (scattered, late_scatter), (reduced, late_reduce) = (
            self._finish(h_gather, "all_gather"), self._finish(h_scatter, "reduce_scatter"),
            self._finish(h_reduce, "all_reduce"))
        for late in (late_gather, late_scatter, late_reduce):
            if late is not None:
                raise late
        total = sum(self.data(r, 4, dtype, salt=3).to(torch.float64) for r in range(self.world)).to(dtype)
        _expect(reduced, total, "async all_reduce")
        _expect(gathered, torch.cat([self.data(r, 2, dtype) for r in range(self.world)]), "async all_gather")
        full = sum(self.data(r, 2 * self.world, dtype).to(torch.float64) for r in range(self.world))
        _expect(scattered, full[2 * self.rank:2 * self.rank + 2].to(dtype), "async reduce_scatter")
        self.all_to_all(dtype, "uneven", async_op=True)

    def subgroups(self, dtype: torch.dtype) -> None:
        """Two interleaved subgroups (even and odd ranks), each reducing and exchanging on its own."""
        evens = list(range(0, self.world, 2))
        odds = list(range(1, self.world, 2))
        even_group = self.comm.new_group(evens)
        odd_group = self.comm.new_group(odds) if odds else None
        mine = evens if self.rank % 2 == 0 else odds
        group, other = (even_group, odd_group) if self.rank % 2 == 0 else (odd_group, even_group)
        if group is None or other is not None:
            raise AssertionError("new_group must return a communicator to members and None to others")
        if group.world_size != len(mine) or group.global_ranks != mine or group.rank != mine.index(self.rank):
            raise AssertionError(f"subgroup layout {group.global_ranks} rank {group.rank}, expected {mine}")
        got = group.all_reduce(self.data(self.rank, 3, dtype))
        want = sum(self.data(r, 3, dtype).to(torch.float64) for r in mine).to(dtype)
        _expect(got, want, "subgroup all_reduce")
        _expect(group.all_gather(self.data(self.rank, 1, dtype)), torch.cat([self.data(r, 1, dtype) for r in mine]), "subgroup all_gather")

    def dispatch_combine(self, dtype: torch.dtype) -> None:
        """Expert-parallel round trip: experts that scale by (id + 1), zero experts, empty and crowded ranks."""
        from moeport.collectives.expert_parallel import ExpertParallelDispatcher

        w, experts, zero, k = self.world, 2 * self.world, 3, 3
        gen = torch.Generator().manual_seed(17 + self.rank)
        tokens = 9 if self.rank != 1 else 0  # rank 1 sends nothing
        ids = torch.stack([torch.randperm(experts + zero, generator=gen)[:k] for _ in range(tokens)] or [torch.empty(0, k, dtype=torch.int64)]).reshape(tokens, k)
        if tokens:
            ids[0] = torch.tensor([experts, experts + 1, 0])  # mostly zero experts
            ids[1] = torch.tensor([experts + 1, experts, experts + 2])  # only zero experts
            ids[2] = torch.tensor([0, 1, experts])  # two experts on rank 0
        weights = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (tokens, k), generator=gen)]
        hidden = (torch.randint(1, 5, (tokens, 6), generator=gen)).to(dtype).to(self.device)
        dispatcher = ExpertParallelDispatcher(self.comm, experts)
        received = dispatcher.dispatch(hidden, ids.to(self.device), weights.to(self.device))
        first = self.rank * (experts // w)
        scale = torch.where(received.local_ids >= 0, (received.local_ids + first + 1).to(torch.float32), 0.0)
        expert_rows = (received.hidden.to(torch.float32) * (scale * received.weights.to(torch.float32)).sum(-1, keepdim=True)).to(dtype)
        got = dispatcher.combine(received, expert_rows)
        ffn = ids < experts
        want_scale = torch.where(ffn, (ids + 1).to(torch.float32) * weights, 0.0).sum(-1, keepdim=True)
        want = (hidden.cpu().to(torch.float32) * want_scale).to(dtype)
        _expect(got.cpu(), want, "dispatch/combine")

    # -- the backend ------------------------------------------------------------
    def backend_streams_events(self) -> None:
        backend = self.rt.backend
        stream = backend.new_stream()
        with backend.stream(stream):
            x = torch.full((64, 64), 2.0, device=self.device) @ torch.full((64, 64), 0.5, device=self.device)
        start, end = backend.new_event(timing=True), backend.new_event(timing=True)
        start.record()
        y = x.sum()
        end.record()
        end.synchronize()
        backend.synchronize()
        if y.item() != 64 * 64 * 64.0 or start.elapsed_time(end) < 0:
            raise AssertionError("stream work or event timing gave a wrong answer")

    def backend_memory_seed(self) -> None:
        backend = self.rt.backend
        backend.reset_peak_memory()
        allocated, peak = backend.memory_allocated(), backend.max_memory_allocated()
        if backend.capabilities.memory_stats and (allocated is None or peak is None or peak < 0):
            raise AssertionError("backend claims memory_stats but reports none")
        backend.manual_seed(1234)
        a = torch.randn(8, device=self.device)
        backend.manual_seed(1234)
        if not torch.equal(a, torch.randn(8, device=self.device)):
            raise AssertionError("manual_seed does not make random numbers repeat")

    # -- the experts' kernels ---------------------------------------------------
    def expert_kernel(self, kind: str, dtype: torch.dtype) -> None:
        """The device's own kernel of `kind` for the MoE experts, where it offers one, against the definition."""
        name, kernel = self.rt.backend.offered_expert_kernels.load(kind)
        if kernel is None:
            raise NotOffered("none offered: the experts run on torch's operators")
        try:
            verify(kind, kernel, self.device, dtype)
        except NotImplementedError as exc:
            raise NotOffered(f"{name} does not take {dtype}") from exc


# (operation, fallback that may serve it, check)
def _checks() -> list[tuple[str, str | None, bool, Callable[[Suite, torch.dtype | None], None]]]:
    """(name, fallback name, takes a dtype, function) for every check, in run order."""
    out: list[tuple[str, str | None, bool, Callable[[Suite, Any], None]]] = []
    for op in ReduceOp:
        out.append((f"all_reduce.{op.value}", "avg" if op is ReduceOp.AVG else None, True,
                    lambda s, d, op=op: s.all_reduce(d, op)))
    out += [
        ("all_gather", None, True, lambda s, d: s.all_gather(d)),
        ("reduce_scatter", "reduce_scatter", True, lambda s, d: s.reduce_scatter(d)),
        ("all_to_all.equal", None, True, lambda s, d: s.all_to_all(d, "equal")),
        ("all_to_all.uneven", "uneven_all_to_all", True, lambda s, d: s.all_to_all(d, "uneven")),
        ("all_to_all.empty", None, True, lambda s, d: s.all_to_all(d, "empty")),
        ("all_to_all.with_counts", "uneven_all_to_all", True, lambda s, d: s.all_to_all_with_counts(d)),
        ("broadcast", None, True, lambda s, d: s.broadcast(d)),
        ("send_recv", None, True, lambda s, d: s.send_recv(d)),
        ("async", "async", True, lambda s, d: s.async_ops(d)),
        ("subgroups", None, True, lambda s, d: s.subgroups(d)),
        ("dispatch_combine", "uneven_all_to_all", True, lambda s, d: s.dispatch_combine(d)),
        ("barrier", None, False, lambda s, d: s.barrier()),
        ("backend.streams_events", None, False, lambda s, d: s.backend_streams_events()),
        ("backend.memory_seed", None, False, lambda s, d: s.backend_memory_seed()),
    ]
    out += [(f"experts.{kind}", None, True, lambda s, d, kind=kind: s.expert_kernel(kind, d)) for kind in KINDS]
    return out


def run_suite(rt: Runtime) -> dict[str, dict[str, dict[str, str]]]:
    """Run every check on this rank, each collective under the cell deadline; returns
    {operation: {dtype: {"status", "detail"}}}."""
    suite = Suite(rt)
    claimed = set(rt.backend.capabilities.dtypes) | {"int64"}
    matrix: dict[str, dict[str, dict[str, str]]] = {}
    profile_timeout, suite.comm.timeout_s = suite.comm.timeout_s, min(suite.comm.timeout_s, CELL_TIMEOUT_S)
    try:
        for name, fallback, takes_dtype, check in _checks():
            row: dict[str, dict[str, str]] = {}
            for dtype_name in (DTYPES if takes_dtype else (NO_DTYPE,)):
                if takes_dtype and (dtype_name not in claimed or (name, dtype_name) in NOT_APPLICABLE):
                    row[dtype_name] = dataclasses.asdict(Cell("unsupported"))
                    continue
                dtype = getattr(torch, dtype_name) if takes_dtype else None
                row[dtype_name] = dataclasses.asdict(_cell(suite, check, dtype, fallback))
            matrix[name] = row
    finally:
        suite.comm.timeout_s = profile_timeout
    return matrix


def _cell(suite: Suite, check: Callable[[Suite, Any], None], dtype: torch.dtype | None, fallback: str | None) -> Cell:
    """One check's outcome; a FAIL that a declared gap would turn into a fallback says which to declare."""
    try:
        check(suite, dtype)
    except NotOffered as exc:
        return Cell("unsupported", str(exc))
    except Exception as exc:  # a wrong answer or an error: the cell fails, the suite goes on
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        gap = getattr(exc, "gap", fallback)
        if gap is not None and gap not in suite.comm.fallbacks:
            detail += (f"; if the library lacks this, declare it on the Backend class: collective_gaps = "
                       f"frozenset({{{gap!r}}}) (or try collectives.fallbacks: [{gap}] in the profile)")
        return Cell("FAIL", detail)
    return Cell("fallback" if fallback is not None and fallback in suite.comm.fallbacks else "pass")


__all__ = ["Suite", "failed", "format_matrix", "merge", "report", "run_suite", "to_json"]
