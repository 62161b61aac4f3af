"""The overlap schedule: the dense path runs while the experts' communication travels; timelines and traces."""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from conftest import run_cli
from moeport.jobs import build_model
from moeport.model.timeline import Timeline, summarize
from moeport.profile import load_profile
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)


class WhereItWaited(Timeline):
    """A Timeline that also tells, for each communication, when its Issue returned, when the driver waited for it,
    and where the driver first saw it complete: "issue" (its Handle was complete when its Issue returned), "wait"
    (when its wait returned) or the name of the compute step after which the driver looked. That last one is told
    by the event the driver recorded as the completion, not by comparing times, so it is exact.

    The schedule's timing spans are the Timeline's own, unchanged; this only keeps what the driver hands `add`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._added = []

    def add(self, name, track, start, end, *blocked) -> None:
        super().add(name, track, start, end, *blocked)
        self._added.append((track, start, end, blocked))

    def spans_and_waits(self):
        """(spans, one dict per comm span, in order: seen, issue_end_ms, wait_ms as (start, end)), in ms from the
        timeline's origin like the spans."""
        spans = self.spans()
        after_step = {id(end): span.name for span, (track, _, end, _) in zip(spans, self._added) if track == "compute"}
        waits = []
        for span, (track, start, end, blocked) in zip(spans, self._added):
            if track != "comm":
                continue
            issue = next(pair for pair in blocked if pair[0] is start)  # (issued, issue returned)
            wait = next(pair for pair in blocked if pair is not issue)  # (wait began, wait returned)
            seen = "issue" if end is issue[1] else "wait" if end is wait[1] else after_step[id(end)]

            def ms(event, span=span, start=start):
                return span.start_ms + start.elapsed_time(event)
            waits.append({"seen": seen, "issue_end_ms": ms(issue[1]), "wait_ms": (ms(wait[0]), ms(wait[1]))})
        return spans, waits


def schedules_side_by_side(rt, repeats):
    """Prefill steps under both schedules, interleaved: (spans, waits, logits, link seconds) per step.

    Waits: WhereItWaited's, per communication. Link seconds are what the emulated link modelled for the step.
    """
    model = build_model(rt)
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(rt.rank))
    out = {"sequential": [], "overlap": []}
    with torch.no_grad():
        model(ids)
        for i in range(repeats):
            for schedule in ("sequential", "overlap") if i % 2 == 0 else ("overlap", "sequential"):
                model.schedule = schedule
                model.timeline = WhereItWaited.for_backend(rt.backend)
                rt.comm.barrier()
                link_before = rt.groups.ep.modelled_seconds
                logits = model(ids)
                link = rt.groups.ep.modelled_seconds - link_before
                out[schedule].append((*model.timeline.spans_and_waits(), logits, link))
    return out


#: The compute step right after each communication's Issue.
FIRST = {"dispatch": "ffn0", "combine": "attn1_core"}


def _around(spans, waits):
    """For each communication: (its span, the compute step right after its Issue, the names of the compute steps
    that ran wholly between its issue and its completion as the driver saw it, its waits entry)."""
    compute = [s for s in spans if s.track == "compute"]
    for c, wait in zip((s for s in spans if s.track == "comm"), waits, strict=True):
        after = [s for s in compute if s.layer == c.layer and s.start_ms >= c.start_ms]
        assert after[0].name == FIRST[c.name], (c.name, after[0].name)
        yield c, after[0], [s.name for s in after if s.end_ms <= c.end_ms], wait


def test_overlap_runs_the_dense_path_while_communication_is_in_flight():
    """Behind a slow link, overlap computes the dense path while dispatch and combine travel, and so waits less.

    Structural, on each rank's timeline, with where the driver waited and where it first saw each communication
    complete (WhereItWaited). Under overlap, a communication that was still in flight when its Issue returned (its
    Handle said so) has the next step (FFN0 after dispatch, attention 1's core after combine) run inside its
    issue-to-completion interval, and one that was not has none; and it is waited for only after that step has run.
    Under sequential, each is waited for between its Issue and the next step, and seen complete when its Issue or
    its wait returned, never later. A schedule that waits at once fails the first and the second; one that does
    not wait at once the third. An Issue that itself lasts as long as the link (gloo stalling on a loaded machine,
    a slower peer) leaves nothing in flight, so only most communications, not all, are asked to have been in flight
    (under both schedules: the sequential checks mean something only for communications that travel). With a
    generous margin: the time the compute stream waited for communication (the only part of a step the schedules
    change) is shorter under overlap by at least a third of the link's modelled time; per step it is the least
    over the ranks, since a rank's wait also holds waiting for a slower peer. Step-time ratios are
    benchmarks/overlap.py's job.
    """
    repeats = 5
    profile = load_profile("emulated-link").replace(emulated_link={"latency_us": 1500.0, "bandwidth_gbps": 1.0})
    results = run_ranks(schedules_side_by_side, 2, profile, args=(repeats,), timeout_s=240)
    overlapped, travelled = [], []
    for r in results:
        for (_, _, a, _), (_, _, b, _) in zip(r["sequential"], r["overlap"]):
            assert torch.equal(a, b)  # same logits, bit for bit
        for spans, _, _, link in r["sequential"]:
            # three link crossings per layer at 1.5 ms each: the link really is slow, and no op beats it
            assert link > 0.008 and summarize(spans)["comm_seconds"] >= link
        for spans, waits, _, _ in r["overlap"]:
            for c, first, inside, wait in _around(spans, waits):
                in_flight = wait["seen"] != "issue"  # not complete when its Issue returned
                assert (first.name in inside) == in_flight, (c.name, inside, wait)  # the first completion
                assert wait["wait_ms"][0] >= first.end_ms, (c.name, wait, first)  # not waited for before that step
                overlapped.append(in_flight)
        for spans, waits, _, _ in r["sequential"]:
            for c, first, inside, wait in _around(spans, waits):
                assert wait["seen"] in ("issue", "wait") and not inside, (c.name, inside, wait)
                assert wait["issue_end_ms"] <= wait["wait_ms"][0] <= wait["wait_ms"][1] <= first.start_ms, (c.name, wait)
                assert c.end_ms <= first.start_ms
                travelled.append(wait["seen"] == "wait")
    assert sum(overlapped) >= len(overlapped) / 2, overlapped
    assert sum(travelled) >= len(travelled) / 2, travelled
    waited = {
        s: statistics.median(min(summarize(r[s][i][0])["exposed_comm_seconds"] for r in results) for i in range(repeats))
        for s in ("sequential", "overlap")
    }
    link = statistics.median(step[3] for r in results for s in ("sequential", "overlap") for step in r[s])
    assert waited["sequential"] - waited["overlap"] >= link / 3, (waited, link)


def test_run_writes_traces_and_png(tmp_path):
    out = tmp_path / "trace"
    result = run_cli("run", "--profile", "emulated-link", "--schedule", "overlap", "--iterations", "2", "--trace", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["timeline.png", "trace-rank0.json", "trace-rank1.json"]
    trace = json.loads((out / "trace-rank1.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in events}
    assert {"attn0", "router", "ffn0", "attn1_qkv", "experts", "attn1_core", "ffn1", "dispatch", "combine"} <= names
    assert {e["tid"] for e in events} == {1, 2}  # compute and comm on separate tracks
    assert {e["args"]["phase"] for e in events} == {"prefill", "decode"}  # every span says its phase
    assert all(e["dur"] >= 0 for e in events)
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlap_windows_are_the_compute_steps_between_issue_and_wait():
    from moeport.model import PRESETS, LongcatForCausalLM
    from moeport.model.schedule import overlap_windows

    layer = LongcatForCausalLM(PRESETS["tiny"]).model.layers[0]
    assert overlap_windows(layer.steps()) == {"dispatch": ["ffn0", "attn1_qkv"], "combine": ["attn1_core", "ffn1"]}
