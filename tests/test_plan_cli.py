"""`moeport plan` as a user runs it: the report, the JSON fields, overrides, user mistakes, the picture,
and the calibration's pieces (tiny sizes: no long timing here)."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from conftest import assert_user_error
from moeport.cli import main
from moeport.model.config import PRESETS
from moeport.plan import calibrate as calibration
from moeport.plan import command
from moeport.plan.hardware import load_hardware, shipped_hardware
from moeport.profile import load_profile

SHIPPED = ["h800", "h20", "h200", "mi300x", "ascend-910b", "gaudi3"]
STAGE_NAMES = {"attention", "dense_ffn", "router", "experts", "dispatch", "combine"}
SCHEDULE_FIELDS = {"layer_us", "tpot_ms", "tokens_per_s_per_user", "tokens_per_s_per_device", "usd_per_million_tokens"}


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def plan(capsys, *args: str) -> _Result:
    """`moeport plan ARGS` in this process, with its exit code and output."""
    code = main(["plan", *args])
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def plan_json(capsys, *args: str) -> dict:
    result = plan(capsys, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_hardware_ships_and_plans(capsys):
    assert set(SHIPPED) <= set(shipped_hardware())
    for name in SHIPPED:
        hardware = load_hardware(name)
        assert hardware.name == name and hardware.price_per_hour is not None
        assert plan_json(capsys, "--hardware", name, "--model", "longcat-flash")["hardware"]["name"] == name


def test_report_names_stages_and_schedules(capsys):
    result = plan(capsys, "--hardware", "h800", "--model", "longcat-flash")
    assert result.returncode == 0, result.stderr
    for word in ("longcat-flash on h800", "attention", "dispatch", "sequential", "sbo", "tbo", "TPOT ms", "ep 128"):
        assert word in result.stdout


@pytest.mark.parametrize("model", ["longcat-flash", "deepseek-v3"])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_json_fields_are_there_and_consistent(capsys, model, phase):
    data = plan_json(capsys, "--hardware", "h800", "--model", model, "--phase", phase)
    assert data["phase"] == phase and set(data["stages_us"]) == STAGE_NAMES
    schedules = data["schedules"]
    assert set(schedules) == {"sequential", "sbo", "tbo"}
    for figures in schedules.values():
        assert SCHEDULE_FIELDS <= set(figures)
        assert figures["tokens_per_s_per_device"] > 0 and figures["usd_per_million_tokens"] > 0
        if phase == "decode":
            assert figures["tpot_ms"] == pytest.approx(1e3 / figures["tokens_per_s_per_user"])
        else:
            assert figures["tpot_ms"] is None and figures["tokens_per_s_per_user"] is None
    stages = data["stages_us"]
    comm = stages["dispatch"] + stages["combine"]
    compute = sum(v for k, v in stages.items() if k not in ("dispatch", "combine"))
    seq, sbo, tbo = (schedules[s]["layer_us"] for s in ("sequential", "sbo", "tbo"))
    assert seq == pytest.approx(compute + comm)
    assert compute - 1e-6 <= sbo <= seq
    assert max(compute, comm) - 1e-6 <= sbo  # SBO hides only what its windows can
    for s in ("sbo", "tbo"):
        assert 0 <= schedules[s]["exposed_comm_us"] <= comm + 1e-6
    assert tbo > 0


def test_longcat_flash_against_deepseek_v3_on_h800(capsys):
    """The report's comparison: LongCat-Flash's best time per output token well under DeepSeek-V3's."""
    best = {}
    for model in ("longcat-flash", "deepseek-v3"):
        schedules = plan_json(capsys, "--hardware", "h800", "--model", model)["schedules"]
        best[model] = min(f["tpot_ms"] for f in schedules.values())
    assert best["longcat-flash"] < 0.75 * best["deepseek-v3"]


def test_set_overrides_one_value(capsys):
    base = plan_json(capsys, "--hardware", "h800", "--model", "longcat-flash")
    data = plan_json(capsys, "--hardware", "h800", "--model", "longcat-flash", "--set", "plan.batch_per_device=32",
                     "--set", "hardware.link_bandwidth_gbps=25", "--set", "hardware.efficiency.link=1")
    assert data["plan"]["batch_per_device"] == 32 and data["hardware"]["link_bandwidth_gbps"] == 25
    latency = 10.0
    # a third of the tokens, on half the bandwidth at 1 / 0.78 of the efficiency
    assert data["stages_us"]["combine"] - latency == pytest.approx(
        (base["stages_us"]["combine"] - latency) / 3 * 2 * 0.78)
    fewer = plan_json(capsys, "--hardware", "h800", "--model", "longcat-flash", "--set", "plan.ffn_experts_per_token=4")
    assert fewer["plan"]["ffn_experts_per_token"] == 4 and fewer["stages_us"]["experts"] < base["stages_us"]["experts"]


def test_profile_sections_name_hardware_and_workload(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("model: {preset: small}\nhardware: h20\nplan: {batch_per_device: 8, ep: 4, tokens_per_step: 1.5}\n")
    data = plan_json(capsys, "--profile", str(path))
    assert data["hardware"]["name"] == "h20" and data["model"]["name"] == "small"
    assert (data["plan"]["ep"], data["plan"]["batch_per_device"]) == (4, 8)
    sbo = data["schedules"]["sbo"]
    assert sbo["tpot_ms"] == pytest.approx(sbo["step_ms"] / 1.5)


def test_checkpoint_config_is_planned(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(PRESETS["small"].to_hf_dict()))
    data = plan_json(capsys, "--hardware", "h200", "--checkpoint", str(ckpt))
    assert data["model"]["hidden"] == 512 and data["model"]["moe_layers"] == 2


def test_plot_writes_a_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    result = plan(capsys, "--hardware", "mi300x", "--model", "deepseek-v3", "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# (profile text, extra arguments, substrings the one error line must contain)
USER_ERRORS = {
    "unknown hardware key": (("hardware: {name: x, matmul_tflops: {bfloat16: 1}, memory_bandwidth_gbps: 1, "
                             "link_bandwidth_gbps: 1, link_latency_us: 1, speed: 3}\n"), [], ["hardware.speed",
                                                                                            "unknown key"]),
    "wrong hardware type": (("hardware: {name: x, matmul_tflops: {bfloat16: 1}, memory_bandwidth_gbps: fast, "
                            "link_bandwidth_gbps: 1, link_latency_us: 1}\n"), [], ["hardware.memory_bandwidth_gbps",
                                                                                  "number", "'fast'"]),
    "unknown dtype rate": (("hardware: {name: x, matmul_tflops: {float64: 1}, memory_bandwidth_gbps: 1, "
                           "link_bandwidth_gbps: 1, link_latency_us: 1}\n"), [], ["hardware.matmul_tflops.float64"]),
    "missing hardware key": (("hardware: {name: x, matmul_tflops: {bfloat16: 1}, memory_bandwidth_gbps: 1, "
                             "link_latency_us: 1}\n"), [], ["hardware.link_bandwidth_gbps", "missing"]),
    "efficiency above 1": (("hardware: {name: x, matmul_tflops: {bfloat16: 1}, memory_bandwidth_gbps: 1, "
                           "link_bandwidth_gbps: 1, link_latency_us: 1, efficiency: {link: 1.5}}\n"), [],
                           ["hardware.efficiency.link", "less than or equal to 1"]),
    "unknown shipped hardware": ("hardware: h9000\n", [], ["hardware", "h9000", "h800"]),
    "unknown plan key": ("hardware: h800\nplan: {batch: 3}\n", [], ["plan.batch", "unknown key"]),
    "wrong plan type": ("hardware: h800\nplan: {batch_per_device: many}\n", [], ["plan.batch_per_device",
                                                                                   "integer", "'many'"]),
    "planner dtype": ("hardware: h800\nplan: {dispatch_dtype: int4}\n", [], ["plan.dispatch_dtype", "float8"]),
    "ep does not divide": ("hardware: h800\nmodel: {preset: small}\nplan: {ep: 3}\n", [], ["plan.ep", "3", "64"]),
    "too many experts per token": ("hardware: h800\nplan: {ffn_experts_per_token: 9}\n", [],
                                   ["plan.ffn_experts_per_token", "top-4"]),
    "no rate for the weights": ("hardware: ascend-910b\nplan: {weight_dtype: float8}\n", [],
                                ["plan.weight_dtype", "float8", "ascend-910b"]),
    "no hardware": ("{}\n", [], ["hardware", "--hardware", "h800"]),
    "bad --set key": ("hardware: h800\n", ["--set", "plan.bacth_per_device=2"], ["--set", "plan.bacth_per_device",
                                                                               "unknown key"]),
    "bad --set value": ("hardware: h800\n", ["--set", "hardware.link_latency_us=-1"],
                        ["--set", "hardware.link_latency_us", "greater than or equal to 0"]),
    "bad --set form": ("hardware: h800\n", ["--set", "batch=2"], ["--set batch=2", "plan.KEY=VALUE"]),
    "unknown model": ("hardware: h800\n", ["--model", "gpt"], ["--model gpt", "deepseek-v3"]),
    "model and checkpoint": ("hardware: h800\n", ["--model", "tiny", "--checkpoint", "x"], ["--checkpoint",
                                                                                           "not allowed"]),
    "missing checkpoint": ("hardware: h800\n", ["--checkpoint", "/nonexistent/ckpt"], ["/nonexistent/ckpt"]),
    "missing hardware file": ("{}\n", ["--hardware", "/nonexistent/hw.yaml"], ["/nonexistent/hw.yaml", "no such file"]),
    "out without calibrate": ("hardware: h800\n", ["--out", "x.yaml"], ["--out", "--calibrate"]),
    "calibrate without out": ("emulated_link: {latency_us: 1, bandwidth_gbps: 1}\n", ["--calibrate"], ["--out"]),
    "calibrate without a link": ("{}\n", ["--calibrate", "--out", "x.yaml"], ["emulated_link", "emulated-link"]),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_exit_2(case, tmp_path, capsys):
    text, extra, needles = USER_ERRORS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    assert_user_error(plan(capsys, "--profile", str(path), *extra), *needles)


def test_hardware_file_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "hw.yaml"
    path.write_text("name: x\nmatmul_tflops: {bfloat16: 1}\nmemory_bandwidth_gbps: 1\nlink_bandwidth_gbps: 1\n"
                    "link_latency_us: 1\nop_overhead: 3\n")
    assert_user_error(plan(capsys, "--hardware", str(path)), str(path), "op_overhead", "unknown key")


def test_profile_validates_the_sections_for_every_command(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("plan: {context_length: 0}\n")
    code = main(["info", "--profile", str(path)])
    assert_user_error(_Result(code, "", capsys.readouterr().err), "plan.context_length", "greater than or equal to 1")


def test_planner_names_are_not_the_runtimes(tmp_path):
    """deepseek-v3, sbo / tbo and float8 belong to the planner: a runnable profile rejects them."""
    for text, key in (("model: {preset: deepseek-v3}\n", "model.preset"), ("schedule: sbo\n", "schedule"),
                      ("dtype: float8\n", "dtype")):
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises(Exception, match=key):
            load_profile(str(path))


def test_calibration_pieces_on_tiny_sizes():
    assert calibration.measure_matmul_flops(n=32, repeats=1) > 0
    assert calibration.measure_memory_bandwidth(megabytes=1, repeats=1) > 0
    assert calibration.measure_weight_stream(megabytes=1, repeats=1) > 0
    assert calibration.measure_weight_stream(megabytes=1, repeats=1, linear=False) > 0
    seconds, ops = calibration.measure_op_overhead(batch=2, steps=2, prompt=4)
    assert seconds > 0 and ops > 100
    assert calibration.rank_threads(1) >= 1 and calibration.rank_threads(10**6) == 1


def test_calibrate_writes_a_hardware_file_the_planner_reads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "CALIBRATION_SIZES", {"matmul_n": 32, "memory_mb": 1, "repeats": 1, "op_steps": 2})
    profile = tmp_path / "one.yaml"
    profile.write_text("model: {preset: tiny}\nemulated_link: {latency_us: 250, bandwidth_gbps: 0.5}\n")
    out = tmp_path / "machine.yaml"
    result = plan(capsys, "--calibrate", "--profile", str(profile), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and os.path.isfile(out)
    hardware = load_hardware(str(out))
    assert (hardware.link_latency_us, hardware.link_bandwidth_gbps) == (250, 0.5)
    assert hardware.op_overhead_us > 0 and hardware.matmul_tflops.float32 > 0
    assert "# median of" in out.read_text()
    data = plan_json(capsys, "--hardware", str(out), "--model", "tiny", "--set", "plan.weight_dtype=float32",
                     "--set", "plan.batch_per_device=2", "--set", "plan.ep=2")
    assert data["schedules"]["sbo"]["usd_per_million_tokens"] is None  # no price for this machine
