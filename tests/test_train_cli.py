"""`moeport train`: exact resume, the same losses on every collective library, checkpoints transformers reads,
the train: section's validation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import run_cli
from moeport.cli import main
from moeport.jobs import run_on_ranks
from moeport.profile import load_profile, model_config_of
from moeport.train_job import last_checkpoint, train_job
from moeport.train_profile import rows_per_step, train_settings

pytestmark = pytest.mark.timeout(300)

STEPS, SEQ, TOKENS = 4, 16, 128  # 8 sequences of 16 tokens a step: small and quick


def profile(name="cpu-gloo", world_size=2):
    return load_profile(name, world_size).replace(train={"seq_len": SEQ, "tokens_per_step": TOKENS, "lr": 3e-3})


def losses(name, world_size, steps, checkpoint_dir=None, save_every=0, resume_from=None):
    p = profile(name, world_size)
    config = model_config_of(p)[0]
    results = run_on_ranks(train_job, (train_settings(p, config), steps, None, SEQ, rows_per_step(p), checkpoint_dir,
                                       save_every, resume_from), p)
    return [h["loss"] for h in results[0]["history"]], results


def test_resume_continues_bit_identically(tmp_path):
    whole, results = losses("cpu-gloo", 2, STEPS)
    assert all(r["history"] == results[0]["history"] for r in results)  # every rank reports the same figures
    assert whole[-1] < whole[0]
    first, _ = losses("cpu-gloo", 2, STEPS // 2, str(tmp_path), save_every=1)
    assert sorted(os.listdir(tmp_path)) == ["step-000001", "step-000002"]
    resumed, _ = losses("cpu-gloo", 2, STEPS, str(tmp_path), resume_from=last_checkpoint(str(tmp_path)))
    assert first + resumed == whole  # the same bits, step by step


def test_every_collective_library_gives_the_same_losses():
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    gloo, _ = losses("cpu-gloo", 2, 3)
    for other in ("generic-cpu", "cpu-mpi"):
        got, _ = losses(other, 2, 3)
        assert got == pytest.approx(gloo, rel=1e-6, abs=0), other


def test_the_cli_trains_saves_and_transformers_reads_the_checkpoint(tmp_path):
    from moeport.model import load_pretrained
    from reference import load_reference

    config = tmp_path / "p.yaml"
    config.write_text(f"parallel: {{world_size: 2}}\ntrain: {{seq_len: {SEQ}, tokens_per_step: {TOKENS}}}\n")
    result = run_cli("train", "--profile", str(config), "--steps", "3", "--json", "--checkpoint-dir",
                     str(tmp_path / "ck"))
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 3 and figures["world_size"] == 2 and figures["loss_last"] < figures["loss_first"]
    for key in ("tokens_per_s", "ffn_experts_per_token", "ffn_experts_per_token_target", "zero_expert_fraction",
                "router_grad_ratio", "backend"):
        assert key in figures
    saved = last_checkpoint(str(tmp_path / "ck"))
    assert saved.endswith("step-000003")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = load_pretrained(saved)
    assert ours.model.layers[0].mlp.router.e_score_correction_bias.abs().sum() > 0  # the controller's state
    with torch.no_grad():
        assert (ours(ids) - load_reference(saved)(ids).logits).abs().max() <= 1e-4

    # grown to twice the layers, trained on from there: the weights and the routers' biases (the controller's
    # state) carried; with lr 0 and the controller still, one step leaves them as they were grown
    grown = tmp_path / "grown"
    assert run_cli("grow", "--checkpoint", saved, "--out", str(grown)).returncode == 0
    still = tmp_path / "still.yaml"
    still.write_text(f"parallel: {{world_size: 2}}\ntrain: {{seq_len: {SEQ}, tokens_per_step: {TOKENS}, lr: 0.0, "
                     "bias_update_rate: 0.0}\n")
    result = run_cli("train", "--profile", str(still), "--init", str(grown), "--steps", "1", "--json",
                     "--checkpoint-dir", str(tmp_path / "ck2"))
    assert result.returncode == 0, result.stderr
    after = load_pretrained(last_checkpoint(str(tmp_path / "ck2"))).state_dict()
    before = load_pretrained(str(grown)).state_dict()
    assert len(after) == len(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert after["model.layers.3.mlp.router.e_score_correction_bias"].abs().sum() > 0


@pytest.mark.parametrize("yaml_text, where", [
    ("train: {lr_decay: linear}\n", "train.lr_decay"),
    ("train: {seq_len: 0}\n", "train.seq_len"),
    ("train: {lr_multipliers: {attention: 2.0}}\n", "train.lr_multipliers"),
    ("train: {adam_betas: [0.9]}\n", "train.adam_betas"),
    ("train: {nope: 1}\n", "train.nope"),
])
def test_the_train_section_is_validated(tmp_path, capsys, yaml_text, where):
    path = tmp_path / "p.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--profile", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and where in err[0]


@pytest.mark.parametrize("args, message", [
    (["--resume"], "--checkpoint-dir"),
    (["--resume", "--checkpoint-dir", "{tmp}"], "no complete checkpoint"),
    (["--profile", "{tmp}/p.yaml"], "multiple of train.seq_len"),
    (["--save-every", "-1"], "--save-every"),
    (["--init", "{tmp}"], "not a checkpoint directory"),
    (["--init", "{tmp}", "--resume", "--checkpoint-dir", "{tmp}"], "give one"),
])
def test_user_mistakes_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "p.yaml").write_text("train: {seq_len: 10, tokens_per_step: 25}\n")
    assert main(["train", "--steps", "1", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_an_injected_bit_flip_stops_the_run_within_one_check_naming_rank_tensor_and_step(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"parallel: {{world_size: 2}}\ntrain: {{seq_len: {SEQ}, tokens_per_step: {TOKENS}}}\n")
    result = run_cli("train", "--profile", str(config), "--world-size", "2", "--steps", "30", "--check-replicas", "4",
                     "--inject-sdc", "1:10", "--json")
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == ""  # no summary: the run stopped
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert line.startswith("moeport: error: ") and "ReplicaMismatchError: silent data corruption" in line, line
    assert "replica check after step 12)" in line  # the first check after the flip: within one interval of 4
    assert "rank 1's copy of model.embed_tokens.weight" in line and "changed in memory after step 10" in line


def test_the_sdc_checks_report_their_overhead(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"parallel: {{world_size: 2}}\ntrain: {{seq_len: {SEQ}, tokens_per_step: {TOKENS}}}\n")
    result = run_cli("train", "--profile", str(config), "--steps", "3", "--check-replicas", "1", "--check-recompute",
                     "2", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < figures["sdc_check_overhead"] < 2  # the recompute doubles one step in three: about 0.5
    for share in ("moe_comm_exposed_share", "grad_sync_exposed_share"):  # each step timed on every rank
        assert 0 < figures[share] < 1, (share, figures)
    assert "SDC checks" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--inject-sdc", "1"], "--inject-sdc: expected RANK:STEP"),
    (["--inject-sdc", "1:x"], "--inject-sdc: expected RANK:STEP"),
    (["--inject-sdc", "2:1"], "--inject-sdc: rank 2 is not a rank of this run"),
    (["--inject-sdc", "1:2"], "--inject-sdc: step 2 is outside this run"),
    (["--check-replicas", "-1"], "--check-replicas"),
    (["--check-recompute", "-3"], "--check-recompute"),
])
def test_bad_sdc_options_exit_2(capsys, args, message):
    assert main(["train", "--world-size", "2", "--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
