"""The emulated interconnect holds each operation to its modelled time, without burning CPU."""

from __future__ import annotations

import time

import pytest
import torch

from moeport.collectives.emulated_link import EmulatedLink
from moeport.collectives.local import LocalCommunicator
from moeport.profile import load_profile
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(180)

LATENCY_US, BANDWIDTH_GBPS = 2000.0, 0.01  # 2 ms + 10 MB/s: easy to measure on a noisy machine
ROWS, WIDTH = 512, 256  # 512 KiB of float32; half of it goes to the other rank


def link_behaviour(rt):
    comm = rt.groups.ep
    assert isinstance(comm, EmulatedLink)
    x = torch.arange(ROWS * WIDTH, dtype=torch.float32).reshape(ROWS, WIDTH) + 1000 * rt.rank
    expected = comm.inner.all_to_all(x)
    modelled = comm.link_seconds(ROWS // 2 * WIDTH * 4)

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    got = comm.all_to_all(x)
    sync_s = time.perf_counter() - t0
    sync_cpu = time.process_time() - cpu0

    comm.barrier()
    t0 = time.perf_counter()
    handle = comm.all_to_all(x, async_op=True)
    issued_s = time.perf_counter() - t0
    time.sleep(modelled)
    overlapped = handle.wait()
    async_s = time.perf_counter() - t0

    t = torch.tensor([float(rt.rank + 1)])
    comm.all_reduce(t)
    return {
        "exact": torch.equal(got, expected) and torch.equal(overlapped, expected),
        "modelled": modelled, "sync": sync_s, "sync_cpu": sync_cpu, "issued": issued_s, "async": async_s,
        "sum": t.item(), "library": comm.library,
    }


def test_link_time_is_modelled_and_overlappable():
    profile = load_profile("emulated-link").replace(
        emulated_link={"latency_us": LATENCY_US, "bandwidth_gbps": BANDWIDTH_GBPS}
    )
    for r in run_ranks(link_behaviour, 2, profile, timeout_s=120):
        assert r["exact"] and r["sum"] == 3.0
        assert r["library"] == "gloo+emulated-link"
        assert abs(r["modelled"] - (0.002 + 256 * 256 * 4 / 1e7)) < 1e-9
        assert r["sync"] >= r["modelled"]  # never faster than the link allows
        assert r["sync_cpu"] < 0.5 * r["sync"]  # the wait sleeps; it does not spin
        assert r["issued"] < 0.5 * r["modelled"]  # async returns at once
        # async op + sleep of the same length: the op hides behind the sleep (generous margin)
        assert r["async"] < 1.6 * r["modelled"]


def test_single_rank_group_is_not_delayed():
    link = EmulatedLink(LocalCommunicator(), latency_us=1e6, bandwidth_gbps=1e-9)
    t0 = time.perf_counter()
    out = link.all_gather(torch.ones(3))
    assert torch.equal(out, torch.ones(3)) and time.perf_counter() - t0 < 0.5


def test_profile_numbers_match_the_shipped_emulated_link():
    link = load_profile("emulated-link").emulated_link
    assert link is not None and link.latency_us > 0 and link.bandwidth_gbps > 0


COUNTS_LATENCY_US = 40000.0  # 40 ms per exchange: long enough to look inside while it is in flight


def threads_waiting_on_the_link() -> list[str]:
    """The names of this process's threads that are inside the emulated link's wait (sleeping out a deadline)."""
    import sys
    import threading

    names = {t.ident: t.name for t in threading.enumerate()}
    waiting = []
    for ident, frame in sys._current_frames().items():
        while frame is not None:
            if frame.f_code.co_filename.endswith("emulated_link.py") and frame.f_code.co_name == "wait":
                waiting.append(names.get(ident, str(ident)))
                break
            frame = frame.f_back
    return waiting


def counts_first_behaviour(rt):
    comm = rt.groups.ep
    ins = [3, 5] if rt.rank == 0 else [7, 0]
    x = torch.arange(sum(ins) * 4, dtype=torch.float32).reshape(-1, 4) + 100 * rt.rank
    expected_rows, expected_splits = comm.inner.all_to_all_with_counts(x, ins)
    comm.barrier()
    issued = time.perf_counter()
    handle = comm.all_to_all_with_counts(x, ins, async_op=True)
    time.sleep(COUNTS_LATENCY_US * 1e-6 * 1.5)  # past the counts' modelled time, before the rows'
    in_flight = threads_waiting_on_the_link()
    done_early = handle.is_completed()
    rows, splits = handle.wait()
    took = time.perf_counter() - issued
    return {
        "exact": torch.equal(rows, expected_rows) and splits == expected_splits,
        "waiting": in_flight, "done_early": done_early, "took": took,
        "modelled": comm.counts_then_rows_seconds(ins, splits, 4 * 4),
    }


def test_an_exchange_with_counts_is_modelled_whole_and_no_thread_waits_beside_the_caller():
    """The counts then the rows, one after the other on the link; while it is in flight, no thread (the
    communicator's worker included) sleeps out a modelled delay: only the caller waits, at the Handle."""
    profile = load_profile("emulated-link").replace(
        emulated_link={"latency_us": COUNTS_LATENCY_US, "bandwidth_gbps": BANDWIDTH_GBPS}
    )
    for r in run_ranks(counts_first_behaviour, 2, profile, timeout_s=120):
        assert r["exact"]
        assert r["waiting"] == []
        assert not r["done_early"]
        assert r["modelled"] >= 2 * COUNTS_LATENCY_US * 1e-6
        assert r["modelled"] <= r["took"] < r["modelled"] + 0.5
