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
