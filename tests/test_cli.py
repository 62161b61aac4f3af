"""The commands as a user runs them: exit codes, outputs, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_cli
from reference import load_reference

pytestmark = pytest.mark.timeout(300)

ABSENT = {"cuda-nccl": "no CUDA device", "rocm-rccl": "no ROCm device", "xpu-xccl": "no 'xpu' device", "npu-hccl": "no 'npu' device"}


@pytest.mark.parametrize("profile", ["cpu-gloo", "generic-cpu", "cpu-mpi", "emulated-link", *ABSENT])
def test_info_for_every_shipped_profile(profile):
    result = run_cli("info", "--profile", profile, "--json")
    if profile in ABSENT and not torch.cuda.is_available():
        assert_user_error(result, ABSENT[profile], f"{profile}.yaml")
        return
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["torch"] == torch.__version__ and "capabilities" in info and info["not_chosen"]


def test_info_names_the_expert_kernels_in_use():
    from moeport.kernels import cpu_fused_experts, mkl_grouped_matmul

    info = json.loads(run_cli("info", "--json").stdout)  # the cpu-gloo default, float32
    fused = "moeport.kernels.cpu_fused_experts:fused_experts" if cpu_fused_experts.fused_experts() else None
    grouped = "moeport.kernels.mkl_grouped_matmul:grouped_matmul" if mkl_grouped_matmul.grouped_matmul() else None
    assert info["expert_kernels"] == {"fused_experts": fused, "grouped_matmul": grouped}
    assert "expert kernels" in run_cli("info").stdout


def test_python_dash_m_and_version():
    assert run_cli("--version").stdout.startswith("moeport ")
    assert "capabilities:" in run_cli("info").stdout


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_forward_writes_logits_in_input_order(checkpoint, tokens, tmp_path, world_size):
    out = tmp_path / "logits.npy"
    result = run_cli("forward", "--checkpoint", checkpoint, "--tokens", tokens, "--out", str(out), "--world-size", world_size)
    assert result.returncode == 0, result.stderr
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (3, 11, 256)
    with torch.no_grad():
        want = load_reference(checkpoint)(torch.from_numpy(np.load(tokens))).logits.numpy()
    assert np.abs(logits - want).max() <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["logits.npy"]  # no temporary left behind


def test_generate_matches_reference_greedy(checkpoint, tokens, tmp_path):
    out = tmp_path / "ids.npy"
    result = run_cli("generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "5",
                     "--out", str(out), "--world-size", "2")
    assert result.returncode == 0, result.stderr
    ids = torch.from_numpy(np.load(tokens))
    # by default each sequence stops at the checkpoint's stop id (generation_config.json: 2) and is filled with it
    want = load_reference(checkpoint).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                               do_sample=False, eos_token_id=2, pad_token_id=2).numpy()
    assert np.array_equal(np.load(out), want)
    new = want[:, ids.shape[1]:].tolist()
    lengths = [ids.shape[1] + (row.index(2) + 1 if 2 in row else len(row)) for row in new]
    assert np.load(tmp_path / "ids.lengths.npy").tolist() == lengths
    printed = run_cli("generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "2")
    assert printed.returncode == 0 and len(printed.stdout.strip().splitlines()) == 3


def test_token_ids_outside_vocabulary(checkpoint, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[1, 2, 999]], dtype=np.int64))
    result = run_cli("forward", "--checkpoint", checkpoint, "--tokens", str(bad), "--out", str(tmp_path / "o.npy"))
    assert_user_error(result, "999", "vocabulary", str(bad))


def test_run_default_profile_prints_json_totals():
    result = run_cli("run", "--iterations", "4", "--json")
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "step_seconds", "comm_seconds", "exposed_comm_seconds", "schedule", "world_size", "backend"):
        assert key in totals
    assert totals["world_size"] == 2 and totals["backend"] == "cpu" and totals["tokens_per_s"] > 0
    assert "zero-expert share" in result.stdout and "hidden" in result.stdout


def test_conformance_command_writes_json(tmp_path):
    out = tmp_path / "conformance.json"
    result = run_cli("conformance", "--profile", "generic-cpu", "--world-size", "2", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and report["results"]["all_to_all.uneven"]["bfloat16"]["status"] == "pass"
    assert "all_gather" in result.stdout and "conformance: passed" in result.stdout
