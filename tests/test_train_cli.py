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
    from reference import load_reference

    from moeport.model import load_pretrained

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
])
def test_user_mistakes_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "p.yaml").write_text("train: {seq_len: 10, tokens_per_step: 25}\n")
    assert main(["train", "--steps", "1", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
