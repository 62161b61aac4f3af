"""`moeport run`'s report per phase (prefill, decode): the JSON totals, the text, the traces and the timeline picture;
and benchmarks/overlap.py's picture of both schedules."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, run_cli
from moeport.model import PRESETS, LongcatForCausalLM
from moeport.model.schedule import Issue
from moeport.testing import run_ranks
from moeport.timeline_plot import windows

pytestmark = pytest.mark.timeout(300)

ITERATIONS = 3
PNG = b"\x89PNG\r\n\x1a\n"


def layer_spans() -> list[str]:
    """The names of the spans one layer records, in order: each Compute step and each communication (at its Wait)."""
    model = LongcatForCausalLM(PRESETS["tiny"])
    return [step.name for step in model.model.layers[0].steps() if not isinstance(step, Issue)]


STAGES = set(layer_spans())
LAYERS = PRESETS["tiny"].num_layers


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    """One `moeport run --json --iterations 3 --trace DIR` on the default profile (cpu-gloo, tiny): (result, DIR)."""
    out = tmp_path_factory.mktemp("run") / "trace"
    result = run_cli("run", "--json", "--iterations", str(ITERATIONS), "--trace", str(out))
    assert result.returncode == 0, result.stderr
    return result, out


def last_json(result) -> dict:
    """The JSON line the run ended with."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_phase_figures(totals: dict) -> None:
    """The per-phase keys are there, beside the whole run's, with sane values that add up to the whole run's."""
    for key in ("tokens_per_s", "step_seconds", "comm_seconds", "exposed_comm_seconds", "hidden_share", "schedule"):
        assert key in totals
    assert totals["prefill_seconds"] > 0 and totals["step_seconds"] > 0
    for phase in ("prefill", "decode"):
        comm, exposed = totals[f"{phase}_comm_seconds"], totals[f"{phase}_exposed_comm_seconds"]
        assert comm > 0 and 0 <= exposed <= comm * (1 + 1e-9), (phase, comm, exposed)
        assert 0.0 <= totals[f"{phase}_hidden_share"] <= 1.0
        assert totals[f"{phase}_hidden_share"] == pytest.approx(1 - exposed / comm)
    for key in ("comm_seconds", "exposed_comm_seconds"):
        assert totals[f"prefill_{key}"] + totals[f"decode_{key}"] == pytest.approx(totals[key], rel=1e-9)


def test_json_line_carries_the_figures_of_each_phase(gloo_run):
    result, _ = gloo_run
    assert_phase_figures(last_json(result))


def test_json_line_of_the_emulated_link_carries_the_figures_of_each_phase():
    result = run_cli("run", "--profile", "emulated-link", "--json", "--iterations", str(ITERATIONS))
    assert result.returncode == 0, result.stderr
    totals = last_json(result)
    assert_phase_figures(totals)
    assert totals["schedule"] == "overlap" and totals["ranks_reporting"] == 2


def test_text_report_labels_the_phases(gloo_run):
    result, _ = gloo_run
    lines = result.stdout.splitlines()
    assert any(line.startswith("  prefill: one forward") for line in lines), result.stdout
    assert any(line.startswith(f"  decode: {ITERATIONS} steps, median step") for line in lines), result.stdout
    header = lines.index("  phase    layer  compute ms  comm ms  exposed ms  hidden")
    rows = [line.split() for line in lines[header + 1: header + 1 + 2 * LAYERS]]
    assert [(row[0], int(row[1])) for row in rows] == [(p, layer) for p in ("prefill", "decode") for layer in range(LAYERS)]
    assert "rank 0" in lines[header - 1] and "per step" in lines[header - 1]
    spans = trace_spans(gloo_run[1] / "trace-rank0.json")
    for phase, layer, compute, comm, exposed, _ in rows:  # each row: its own phase's spans (decode: per step)
        mine = [s for s in spans if s["phase"] == phase and s["layer"] == int(layer)]
        steps = len({s["step"] for s in mine})
        length = {track: sum(s["end_ms"] - s["start_ms"] for s in mine if s["track"] == track) / steps
                  for track in ("compute", "comm")}
        assert float(compute) == pytest.approx(length["compute"], abs=0.006)
        assert float(comm) == pytest.approx(length["comm"], abs=0.006)
        assert float(exposed) <= float(comm) + 0.01


def trace_spans(path) -> list[dict]:
    """The spans of one rank's Chrome trace, as the reports take them (ms, with phase and step)."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    return [{"name": e["name"], "track": e["cat"], "layer": e["args"]["layer"], "phase": e["args"].get("phase"),
             "step": e["args"].get("step"), "exposed_ms": e["args"]["exposed_ms"], "start_ms": e["ts"] / 1e3,
             "end_ms": (e["ts"] + e["dur"]) / 1e3} for e in events]


def test_traces_keep_every_span_with_its_phase(gloo_run):
    _, out = gloo_run
    assert sorted(os.listdir(out)) == ["timeline.png", "trace-rank0.json", "trace-rank1.json"]
    for rank in (0, 1):
        spans = trace_spans(out / f"trace-rank{rank}.json")
        per_forward = LAYERS * len(layer_spans())
        assert [s for s in spans if s["phase"] not in ("prefill", "decode")] == []
        prefill = [s for s in spans if s["phase"] == "prefill"]
        decode = [s for s in spans if s["phase"] == "decode"]
        assert len(prefill) == per_forward and {s["step"] for s in prefill} == {0}
        assert len(decode) == ITERATIONS * per_forward and {s["step"] for s in decode} == set(range(ITERATIONS))
        assert max(s["end_ms"] for s in prefill) <= min(s["start_ms"] for s in decode)


def assert_one_layer_and_one_step(spans: list[dict]) -> None:
    """What the picture draws of one rank's spans: one prefill layer and one decode step (all layers), every stage."""
    drawn = windows(spans)
    assert list(drawn) == ["prefill", "decode"]
    prefill, decode = drawn["prefill"].bars, drawn["decode"].bars
    assert len({(b.step, b.layer) for b in prefill}) == 1 and {b.name for b in prefill} == STAGES
    assert sorted(b.name for b in prefill) == sorted(layer_spans())
    assert len({b.step for b in decode}) == 1 and {b.layer for b in decode} == set(range(LAYERS))
    for layer in range(LAYERS):
        assert sorted(b.name for b in decode if b.layer == layer) == sorted(layer_spans())
    for window in drawn.values():
        assert min(b.start_ms for b in window.bars) == 0.0
        assert {b.track for b in window.bars} == {"compute", "comm"}
        for bar in window.bars:
            assert all(bar.start_ms <= a < b <= bar.end_ms for a, b in bar.waits)


def test_timeline_png_draws_one_prefill_layer_and_one_decode_step_per_rank(gloo_run):
    _, out = gloo_run
    assert (out / "timeline.png").read_bytes()[:8] == PNG
    for rank in (0, 1):
        assert_one_layer_and_one_step(trace_spans(out / f"trace-rank{rank}.json"))


def span(name, track, start, end, exposed=0.0):
    """A span of layer 0 of the prefill."""
    return {"name": name, "track": track, "layer": 0, "phase": "prefill", "step": 0, "start_ms": start,
            "end_ms": end, "exposed_ms": exposed}


def test_waits_drawn_are_the_issue_and_the_wait_or_the_whole_comm():
    overlapped = [span("router", "compute", 0, 1), span("dispatch", "comm", 1, 6, 1.5), span("ffn0", "compute", 1.5, 3),
                  span("attn1_qkv", "compute", 3, 5), span("experts", "compute", 6, 7)]
    bars = {b.name: b for b in windows(overlapped)["prefill"].bars}
    assert bars["dispatch"].waits == [(1, 1.5), (5, 6)]  # its issue; its wait after attn1_qkv
    assert all(b.waits == [] for name, b in bars.items() if name != "dispatch")
    sequential = [span("router", "compute", 0, 1), span("dispatch", "comm", 1, 6, 5), span("ffn0", "compute", 6, 7)]
    assert {b.name: b.waits for b in windows(sequential)["prefill"].bars}["dispatch"] == [(1, 6)]
    hidden = [span("dispatch", "comm", 1, 3), span("ffn0", "compute", 1, 3)]  # seen complete after ffn0
    assert {b.name: b.waits for b in windows(hidden)["prefill"].bars}["dispatch"] == []


def test_windows_pick_the_median_prefill_layer_and_decode_step():
    spans = []
    for layer, length in enumerate((5.0, 1.0, 3.0)):  # prefill layers: the median is layer 2
        spans.append(span("attn0", "compute", 10 * layer, 10 * layer + length))
        spans[-1]["layer"] = layer
    for step, length in enumerate((2.0, 9.0, 4.0, 7.0)):  # decode steps of 4: the shorter middle one is step 2
        spans.append({**span("attn0", "compute", 100 + 20 * step, 100 + 20 * step + length), "phase": "decode",
                      "step": step})
    drawn = windows(spans)
    assert {b.layer for b in drawn["prefill"].bars} == {2} and drawn["prefill"].length_ms == 3.0
    assert {b.step for b in drawn["decode"].bars} == {2} and drawn["decode"].length_ms == 4.0


def test_benchmark_plot_draws_both_schedules_of_each_phase(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))  # the spawned ranks import it the same way
    import overlap

    results = run_ranks(overlap.measure, 2, "cpu-gloo", args=(2, 8, 1), timeout_s=240)
    path = str(tmp_path / "overlap.png")
    assert overlap.plot(path, "t", results)
    assert (tmp_path / "overlap.png").read_bytes()[:8] == PNG
    for r in results:
        assert sorted(r["spans"]) == ["overlap", "sequential"]
        for spans in r["spans"].values():
            assert_one_layer_and_one_step(spans)
            decode = [s for s in spans if s["phase"] == "decode"]
            assert {s["step"] for s in decode} == set(range(overlap.DECODE_STEPS))
        for window in windows(r["spans"]["sequential"]).values():  # waited for at once: the whole comm is exposed
            assert all(b.waits == [(b.start_ms, b.end_ms)] for b in window.bars if b.track == "comm")
