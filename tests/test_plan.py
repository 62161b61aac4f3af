"""The planner's formulas on worked examples computed by hand, and its schedules' overlap rules."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from moeport.model.config import PRESETS
from moeport.model.schedule import Compute, overlap_windows
from moeport.plan import stages
from moeport.plan.architectures import DEEPSEEK_V3, Architecture, architecture
from moeport.plan.calibrate import CountOperators
from moeport.plan.hardware import load_hardware, parse_hardware
from moeport.plan.planner import default_ep, make_plan, schedule_figures, stages_seconds
from moeport.plan.schedules import SCMOE_STEPS, run_schedule, simulate, windows
from moeport.plan.workload import PlanSection

# A toy model small enough to cost by hand: hidden 4, 2 heads of nope 2 / rope 2 / v 2, latent 2, q_lora 2,
# dense FFNs of 8, 4 FFN + 4 zero experts of width 2, top-2 (so 2 x 4 / 8 = 1 FFN expert per token).
TOY = Architecture(name="toy", layout="scmoe", hidden=4, moe_layers=1, dense_layers=0, heads=2, q_lora=2, kv_lora=2,
                   nope=2, rope=2, v=2, dense_ffn=8, experts=4, zero_experts=4, top_k=2, expert_ffn=2,
                   shared_experts=0, vocab=10)
# 1e6 FLOP/s, 1e6 bytes/s, 1 us per operator, a link of 1e6 bytes/s and 100 us per message.
TOY_HW = parse_hardware({"name": "toy", "matmul_tflops": {"float32": 1e-6}, "memory_bandwidth_gbps": 1e-3,
                         "link_bandwidth_gbps": 1e-3, "link_latency_us": 100, "op_overhead_us": 1}, "toy")


def toy_decode(**changes) -> stages.Workload:
    """3 sequences decoding after 5 cached positions, ep 2, 1 FFN expert per token, float32 everywhere."""
    rest = {"ep": 2, "ffn_experts_per_token": 1.0, "weight_dtype": "float32", "dispatch_dtype": "float32",
                "combine_dtype": "float32"}
    return dataclasses.replace(stages.decode_workload(3, 5, **rest), **changes)


def test_default_ffn_experts_per_token_is_topk_less_the_zero_share():
    assert TOY.default_ffn_experts_per_token() == 2 * 4 / 8
    assert architecture("longcat-flash").default_ffn_experts_per_token() == 12 * 512 / 768 == 8.0
    assert DEEPSEEK_V3.default_ffn_experts_per_token() == 8


def test_mla_projection_by_hand():
    work = stages.mla_projection(TOY, toy_decode())
    a_proj, q_b = 4 * (2 + 2 + 2), 2 * 2 * (2 + 2)  # weights: [4 -> q_lora + kv_lora + rope], [2 -> 2 heads x 4]
    assert work.flops == 2 * 3 * a_proj + 2 * 3 * q_b == 240
    # weights (4 bytes) + each token's inputs and outputs: 4 in, 6 out; 2 in, 8 out
    assert work.bytes == (a_proj + q_b) * 4 + 3 * (4 + 6) * 4 + 3 * (2 + 8) * 4 == 400
    # per token: three norms (3 x width each: 4, 2, 2) and the rotation (8 x (heads + 1) x rope)
    assert work.elem_bytes == 3 * (3 * 4 + 3 * 2 + 3 * 2 + 8 * 3 * 2) * 4 == 864
    timed = stages.time_of(work, TOY_HW, toy_decode())
    assert timed.seconds == pytest.approx((max(240, 400) + 864) / 1e6)  # no operators on a bare part
    assert timed.bound == "elementwise"


def test_mla_core_decoding_by_hand():
    work = stages.mla_core(TOY, toy_decode())
    keys = 5 + 1
    # kv_b folded in (2 x 2 x 4 weights) and o_proj (2 x 2 -> 4): 96 FLOPs each; scores and values in the latent
    assert work.flops == 2 * 3 * 16 + 2 * 3 * 16 == 192
    assert work.act_flops == 2 * 3 * 2 * keys * ((2 + 2) + 2) == 432
    cache = 3 * 5 * 4 * 4 + 3 * 4 * 4  # read 5 cached (latent + rope) rows per sequence, write the new one
    absorb = 16 * 4 + 3 * (2 * (2 + 2) + 2 * (2 + 2)) * 4
    o_proj = 16 * 4 + 3 * (4 + 4) * 4
    assert work.bytes == cache + absorb + o_proj == 704
    assert work.elem_bytes == 3 * (2 * 2 * 4 + 2 * 2 * 2 + 3 * 4) * 4 == 432


def test_mla_core_prefill_counts_causal_pairs():
    wl = stages.prefill_workload(8, 4, ep=2, ffn_experts_per_token=1.0, weight_dtype="float32",
                                 dispatch_dtype="float32", combine_dtype="float32")
    assert (wl.sequences, wl.new, wl.past) == (2, 4, 0)  # two prompts of 4
    pairs = 2 * (4 * 5 / 2)  # each query sees itself and the keys before it
    assert stages.mla_core(TOY, wl).act_flops == 2 * pairs * 2 * (2 + 2 + 2) == 480
    chunk = stages.prefill_workload(2, 6, **{k: getattr(wl, k) for k in ("ep", "ffn_experts_per_token", "weight_dtype",
                                                                          "dispatch_dtype", "combine_dtype")})
    assert (chunk.sequences, chunk.new, chunk.past) == (1, 2, 4)  # the last 2 positions of a 6-token prompt


def test_dense_ffn_and_router_by_hand():
    wl = toy_decode()
    ffn = stages.swiglu(TOY, wl, 8)
    assert ffn.flops == 2 * 3 * (3 * 4 * 8) == 576
    assert ffn.bytes == 96 * 4 + 3 * (4 + 16) * 4 + 3 * (8 + 4) * 4 == 768
    assert ffn.elem_bytes == 3 * (5 * 8 + 3 * 4) * 4 == 624  # silu and product (5 x width), a norm or residual
    router = stages.router(TOY, wl)
    assert router.flops == 2 * 3 * 4 * 8 == 192  # 8 outputs: FFN and zero experts
    assert router.bytes == 4 * 4 * 8 + 3 * (4 * 4 + 4 * 8) == 272  # float32 classifier, inputs, scores


def test_experts_by_hand():
    wl = toy_decode()
    assert stages.slots_per_device(wl) == 3 * 1.0
    # 2 experts here; the 6 slots of both devices each reach one of the 4 experts
    reached = 2 * (1 - (3 / 4) ** 6)
    assert stages.experts_reached(TOY, wl) == pytest.approx(reached)
    work = stages.experts(TOY, wl)
    assert work.flops == 2 * 3 * (3 * 4 * 2) == 144
    assert work.bytes == pytest.approx(reached * 24 * 4 + 3 * (2 * 4 + 3 * 2) * 4)
    assert work.elem_bytes == (2 * 3 + 4 * 3) * 4 * 4


def test_dispatch_and_combine_by_hand():
    wl = toy_decode()
    rows = 3 * (2 - 1) * (1 - (1 - 1 / 2) ** 1)  # each token to the other device when a slot lands there
    assert stages.rows_leaving(wl) == rows == 1.5
    d, c = stages.dispatch(TOY, wl), stages.combine(TOY, wl)
    assert (d.link_bytes, d.messages) == (rows * (4 * 4 + 8 * 2), 1)  # hidden + an id and a weight per slot
    assert (c.link_bytes, c.messages) == (rows * 4 * 4, 1)
    assert stages.time_of(d, TOY_HW, wl).seconds == pytest.approx(100e-6 + 48 / 1e6)
    prefill = dataclasses.replace(wl, phase="prefill", dispatch_dtype="float8")
    assert stages.dispatch(TOY, prefill).messages == 2  # the counts travel first
    assert stages.dispatch(TOY, prefill).link_bytes == rows * (4 * 1 + 8 * 2 + 4)  # one float32 scale per 128
    alone = toy_decode(ep=1)
    assert stages.dispatch(TOY, alone) == stages.Work() and stages.combine(TOY, alone) == stages.Work()


def test_large_ep_sends_nearly_every_slot():
    wl = dataclasses.replace(toy_decode(), tokens=1.0, ep=128, ffn_experts_per_token=8.0)
    assert stages.rows_leaving(wl) == pytest.approx(127 * (1 - (127 / 128) ** 8)) == pytest.approx(7.72, abs=0.01)


def test_operators_add_overhead_where_the_host_pays_for_them():
    wl = toy_decode()
    parts = stages.layer_parts(TOY, wl)
    ffn0 = parts["ffn0"]
    assert ffn0.ops == stages.OPS["ffn0"][0]
    expected = (max(ffn0.flops, ffn0.bytes) + ffn0.elem_bytes) / 1e6 + ffn0.ops * 1e-6
    assert stages.time_of(ffn0, TOY_HW, wl).seconds == pytest.approx(expected)
    assert parts["router"].ops == stages.OPS["router"][0] + stages.EXCHANGE_OPS["router"][0]
    assert stages.layer_parts(TOY, toy_decode(ep=1))["router"].ops == stages.OPS["router"][0]


# Part times in seconds for the schedule examples: dispatch 5 against a window of ffn0 + attn1_qkv = 3,
# combine 2 against attn1_core + ffn1 = 3.
FULL = {"attn0": 1, "router": 1, "ffn0": 2, "attn1_qkv": 1, "experts": 1, "attn1_core": 1, "ffn1": 2,
        "dispatch": 5, "combine": 2}
HALF = {"attn0": .5, "router": .5, "ffn0": 1, "attn1_qkv": .5, "experts": .5, "attn1_core": .5, "ffn1": 1,
        "dispatch": 3, "combine": 1}


def test_sequential_is_the_sum_and_sbo_hides_only_its_windows():
    seq = run_schedule("sequential", SCMOE_STEPS, FULL, HALF, 1)
    assert (seq.seconds, seq.exposed) == (16, 7)
    sbo = run_schedule("sbo", SCMOE_STEPS, FULL, HALF, 1)
    # attn0 + router + max(dispatch 5, window 3) + experts + max(combine 2, window 3)
    assert sbo.seconds == 1 + 1 + max(5, 2 + 1) + 1 + max(2, 1 + 2) == 11
    assert sbo.exposed == 5 - 3  # only what the window cannot cover
    assert run_schedule("sbo", SCMOE_STEPS, FULL, HALF, 4).seconds == 4 * 11


def test_tbo_alternates_micro_batches_at_each_issue():
    # By hand: A attn0 router | B attn0 router | A ffn0 qkv, waits 0.5 for its dispatch (on the link 1 -> 4),
    # experts | B ffn0 qkv, waits 1 (its dispatch 4 -> 7) | A core ffn1 | B core ffn1: ends at 10.5.
    run = simulate(SCMOE_STEPS, [HALF, HALF], layers=1)
    assert run.seconds == pytest.approx(10.5) and run.exposed == pytest.approx(1.5)
    links = [(s.name, s.micro_batch, s.start, s.end) for s in run.spans if s.track == "link"]
    assert links == [("dispatch", 0, 1, 4), ("dispatch", 1, 4, 7), ("combine", 0, 7, 8), ("combine", 1, 8, 9)]


def test_planner_windows_are_the_runtimes():
    from moeport.model.layer import ScMoELayer

    runtime = overlap_windows(ScMoELayer(PRESETS["tiny"], range(8)).steps())
    assert windows(SCMOE_STEPS) == {name: [s for s in steps if s != "sum"] for name, steps in runtime.items()}


def test_operator_counts_follow_the_layer():
    """The dense parts' operator counts stay near what the tiny model's layer launches (a drift guard)."""
    from moeport.model import LongcatForCausalLM
    from moeport.model.init import init_weights

    model = init_weights(LongcatForCausalLM(PRESETS["tiny"])).eval()
    layer = model.model.layers[0]
    counts: dict[str, int] = collections.Counter()
    steps = layer.steps

    def counted_steps():
        out = []
        for step in steps():
            if isinstance(step, Compute):
                def run(state, step=step):
                    mode = CountOperators()
                    with mode:
                        step.run(state)
                    counts[step.name] += mode.count
                step = Compute(step.name, run)
            out.append(step)
        return out

    layer.steps = counted_steps
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = model.new_caches(2, 8)
        model(ids, caches)
        counts.clear()
        model(ids[:, :1], caches)
    for part in ("attn0", "attn1_qkv", "attn1_core", "ffn0", "ffn1", "router"):
        assert counts[part] == pytest.approx(stages.OPS[part][0], rel=0.2), part


def test_h800_comparison_is_consistent():
    h800 = load_hardware("h800")
    for name in ("longcat-flash", "deepseek-v3"):
        plan = make_plan(architecture(name), h800, PlanSection())
        figures = {s: schedule_figures(plan, s) for s in ("sequential", "sbo", "tbo")}
        assert figures["sbo"]["layer_us"] <= figures["sequential"]["layer_us"]
        stage = stages_seconds(plan)
        comm = stage["dispatch"] + stage["combine"]
        assert figures["sequential"]["exposed_comm_us"] == pytest.approx(comm * 1e6)
        for s in ("sbo", "tbo"):  # overlap never hides more than the communication there is
            assert 0 <= figures[s]["exposed_comm_us"] <= comm * 1e6 + 1e-6
        compute = sum(v for k, v in stage.items() if k not in ("dispatch", "combine"))
        assert figures["sbo"]["layer_us"] >= compute * 1e6 - 1e-6  # the compute stream does all its work
        assert figures["sbo"]["tpot_ms"] == pytest.approx(1e3 / figures["sbo"]["tokens_per_s_per_user"])
    assert default_ep(architecture("longcat-flash")) == 128 and default_ep(architecture("tiny")) == 8
