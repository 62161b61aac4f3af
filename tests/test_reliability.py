"""Reliability: user errors are one line and exit 2, a dead rank ends the job naming it, saves are atomic, runs repeat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_cli
from moeport.launch import RankFailure, spawn
from moeport.model import load_pretrained, save_pretrained
from reference import edit_checkpoint

pytestmark = pytest.mark.timeout(300)


def _wrong_config(src, dst):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["kv_lora_rank"] = 24
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "t"}


def test_cli_user_errors(checkpoint, tokens, tmp_path):
    """The command-line cases of the error table (the profile cases are in test_profile.py)."""
    out = str(tmp_path / "o.npy")
    cases = [
        (["forward", "--checkpoint", "/no/such/ckpt", "--tokens", tokens, "--out", out], {}, ["--checkpoint", "/no/such/ckpt"]),
        (["forward", "--checkpoint", checkpoint, "--tokens", "/no/such.npy", "--out", out], {}, ["--tokens", "/no/such.npy"]),
        (["forward", "--checkpoint", edit_checkpoint(checkpoint, tmp_path / "missing",
                                                         lambda t: t.pop("model.layers.0.mlps.1.down_proj.weight")),
          "--tokens", tokens, "--out", out], {}, ["missing tensor model.layers.0.mlps.1.down_proj.weight"]),
        (["forward", "--checkpoint", edit_checkpoint(checkpoint, tmp_path / "dtype",
                                                         lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)})),
          "--tokens", tokens, "--out", out], {}, ["model.norm.weight", "dtype"]),
        (["forward", "--checkpoint", _wrong_config(checkpoint, tmp_path / "config"), "--tokens", tokens, "--out", out],
         {}, ["self_attn.0.kv_a_", "has shape", "config.json implies"]),  # the first tensor kv_lora_rank sizes
        (["generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "0"], {}, ["--max-new-tokens"]),
        (["generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "2", "--sample",
          "--temperature", "0"], {}, ["--temperature", "above 0", "0.0"]),
        (["generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "2", "--top-k", "-3"], {},
         ["--top-k", "-3"]),
        (["generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "2", "--top-p", "1.5"], {},
         ["--top-p", "1.5"]),
        (["run", "--iterations", "0"], {}, ["--iterations"]),
        (["run", "--world-size", "4", "--iterations", "1"], TORCHRUN_ENV, ["--world-size 4", "torchrun", "2 ranks"]),
        (["run", "--schedule", "fastest"], {}, ["--schedule", "fastest"]),
        (["info", "--world-size", "two"], {}, ["--world-size", "two"]),
    ]
    for args, env, needles in cases:
        assert_user_error(run_cli(*args, env=env), *needles)


def _die_mid_run(rank_to_kill: int) -> int:
    import torch.distributed as dist

    from moeport.profile import load_profile
    from moeport.runtime import Runtime

    with Runtime.start(load_profile("cpu-gloo").replace(**{"collectives.timeout_s": 20.0})) as rt:
        for step in range(10_000):
            t = torch.ones(1000)
            rt.comm.all_reduce(t)
            if step == 20 and rt.rank == rank_to_kill:
                os.kill(os.getpid(), signal.SIGKILL)
        return dist.get_rank()


def test_killed_rank_is_named_and_the_job_ends():
    started = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 failed: killed by signal SIGKILL"):
        spawn(_die_mid_run, (1,), 2, timeout_s=120)
    assert time.monotonic() - started < 20  # well within the collectives timeout


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(p) for p in f.read().split()]
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigkill_of_a_rank_during_moeport_run_leaves_nothing_behind():
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "moeport", "run", "--iterations", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ranks: list[int] = []
        deadline = time.monotonic() + 60
        while len(ranks) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            ranks = sorted(p for p in _children(proc.pid) if "spawn_main" in _cmdline(p))
        assert len(ranks) == 2, "the two ranks did not start"
        time.sleep(3)  # let them get into the decode loop
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == "moeport: error: rank 1 failed: killed by signal SIGKILL", stderr
    time.sleep(1)
    assert not [p for p in ranks if os.path.exists(f"/proc/{p}") and "spawn_main" in _cmdline(p)], "orphaned rank"


def test_interrupted_save_keeps_the_previous_checkpoint(checkpoint, tmp_path, monkeypatch):
    import moeport.model.checkpoint as ckpt

    target = str(tmp_path / "saved")
    model = load_pretrained(checkpoint)
    save_pretrained(model, target)
    before = open(os.path.join(target, "model.safetensors"), "rb").read()

    def half_then_interrupt(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", half_then_interrupt)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target)
    assert open(os.path.join(target, "model.safetensors"), "rb").read() == before
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]  # no temporary left
    load_pretrained(target)


SAVE_LOOP = """
import sys, torch
from moeport.model import load_pretrained, save_pretrained
model = load_pretrained(sys.argv[1])
print("ready", flush=True)
while True:
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_pretrained(model, sys.argv[2])
"""


def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(checkpoint, tmp_path):
    target = str(tmp_path / "saved")
    save_pretrained(load_pretrained(checkpoint), target)
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, checkpoint, target], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        load_pretrained(target)  # whatever instant the kill hit, the final names hold a whole checkpoint


def _seeded_outputs(rt, tokens):
    """On each rank of a preset model with seeded random weights: the forward job's logits (on rank 0), the run job's
    expert counts (its prompt is seeded too), and this rank's weights with the global ids of its experts."""
    from moeport.jobs import build_model, forward_job, run_job

    logits = forward_job(rt, tokens)
    counts = run_job(rt, 2, 2, 6)["expert_counts"]
    model = build_model(rt)
    return {"logits": logits, "counts": counts, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "experts": [list(layer.mlp.experts.global_ids) for layer in model.model.layers]}


def test_same_profile_seed_and_world_size_give_identical_outputs(tokens):
    """The `tiny` preset on two ranks, with the profile's seed: the same seed gives bit-identical logits, expert
    counts and weights, another seed other weights and logits; and the weights are those one process builds with
    that seed (each tensor seeded by its name, each expert by its global id), split over the ranks."""
    from moeport.model import LongcatForCausalLM
    from moeport.model.init import init_weights
    from moeport.profile import load_profile, model_config_of
    from moeport.testing import run_ranks

    ids = np.load(tokens)
    profile = load_profile("cpu-gloo").replace(model={"preset": "tiny"})
    first, again, other = (run_ranks(_seeded_outputs, 2, profile.replace(seed=seed), args=(ids,)) for seed in (5, 5, 6))
    assert first[1]["logits"] is None and first[0]["logits"].shape == (*ids.shape, 256)
    assert np.array_equal(first[0]["logits"], again[0]["logits"])
    assert not np.allclose(first[0]["logits"], other[0]["logits"])
    for rank in range(2):
        assert first[rank]["counts"] == again[rank]["counts"] and sum(first[rank]["counts"]) > 0
        assert first[rank]["state"].keys() == again[rank]["state"].keys() == other[rank]["state"].keys()
        for name, tensor in first[rank]["state"].items():
            assert torch.equal(tensor, again[rank]["state"][name]), name
            if tensor.std() > 0:  # not a norm (ones) or a bias (zeros): the seed matters
                assert not torch.equal(tensor, other[rank]["state"][name]), name
    config, _ = model_config_of(profile)
    whole = init_weights(LongcatForCausalLM(config), 5).state_dict()
    for name, tensor in whole.items():
        if name.endswith(("experts.gate_up", "experts.down")):  # each rank holds its own experts: [local, ...]
            layer = int(name.split(".")[2])
            parts = {e: r["state"][name][i] for r in first for i, e in enumerate(r["experts"][layer])}
            assert sorted(parts) == list(range(tensor.shape[0])), name
            assert all(torch.equal(tensor[e], part) for e, part in parts.items()), name
        else:
            assert all(torch.equal(tensor, r["state"][name]) for r in first), name
    with torch.no_grad():  # and so the same logits, up to the order of sums across ranks
        one = init_weights(LongcatForCausalLM(config), 5).eval()(torch.from_numpy(ids))
    np.testing.assert_allclose(first[0]["logits"], one.numpy(), rtol=1e-5, atol=1e-5)
