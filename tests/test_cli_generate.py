"""`moeport generate` with prompts of different lengths (.jsonl), stop and pad ids, and its output files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from moeport.cli import main
from moeport.jobs import generated_part
from moeport.model import load_pretrained
from moeport.model.generation import left_pad

pytestmark = pytest.mark.timeout(300)

#: Prompts of four lengths: under --world-size 2 each rank gets two of different lengths and left-pads them.
PROMPTS = [[5, 17, 200, 3, 9, 44, 81], [100, 7], [250, 1, 2, 3], [60, 61, 62, 63, 64]]
NEW = 6
PAD = 255


@pytest.fixture(scope="module")
def decoding(checkpoint, tmp_path_factory):
    """The prompts as a .jsonl file (a blank line in the middle), a stop id that ends one prompt's decoding early
    and not another's (picked from a greedy run of each prompt alone, stopping never), and each prompt's expected
    sequence under that stop id: the prompt decoded alone, cut after its first stop token."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps(p) for p in PROMPTS]
    path.write_text("\n".join(lines[:2] + ["", "  "] + lines[2:]) + "\n")
    model = load_pretrained(checkpoint)

    def alone(prompt, eos):
        return model.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_id=eos)[0, len(prompt):].tolist()

    free = [alone(p, []) for p in PROMPTS]
    # a token one prompt produces before its last step and another never produces: one stops early, one runs on
    eos = next(t for g in free for t in g[:-2] if t != PAD and any(t not in other for other in free))
    want = []
    for prompt in PROMPTS:
        new = alone(prompt, [eos])
        cut = new.index(eos) + 1 if eos in new else len(new)
        want.append(prompt + new[:cut])
    assert any(len(w) - len(p) < NEW for w, p in zip(want, PROMPTS))  # one stops early ...
    assert any(len(w) - len(p) == NEW and eos not in w[len(p):] for w, p in zip(want, PROMPTS))  # ... one does not
    return str(path), eos, want


@pytest.mark.parametrize("world_size, out", [("1", None), ("1", "ids.npy"), ("2", "ids.jsonl"), ("2", "ids.npy")])
def test_generate_jsonl_prompts_match_each_prompt_alone(checkpoint, decoding, tmp_path, world_size, out):
    prompts, eos, want = decoding
    args = ["generate", "--checkpoint", checkpoint, "--tokens", prompts, "--max-new-tokens", str(NEW),
            "--eos-id", str(eos), "--world-size", world_size]
    if out and out.endswith(".npy"):
        args += ["--pad-id", str(PAD)]
    if out:
        args += ["--out", str(tmp_path / out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    if out is None:  # printed: one JSON list a line, as the .jsonl output holds them
        assert [json.loads(line) for line in result.stdout.strip().splitlines()] == want
    elif out.endswith(".jsonl"):
        assert [json.loads(line) for line in (tmp_path / out).read_text().splitlines()] == want
    else:
        ids, lengths = np.load(tmp_path / "ids.npy"), np.load(tmp_path / "ids.lengths.npy")
        assert ids.dtype == np.int64 and lengths.dtype == np.int64
        assert ids.shape == (len(want), max(map(len, want))) and lengths.tolist() == [len(w) for w in want]
        for row, length, sequence in zip(ids, lengths, want):
            assert row[:length].tolist() == sequence and (row[length:] == PAD).all()  # --pad-id fills the rest
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.lengths.npy", "ids.npy"]  # no temporary left


@pytest.mark.parametrize("lines, line, needles", [
    (["[1, 2]", "", '{"ids": [3]}'], 3, ["expected a JSON list"]),
    (["[1, 2]", "[4, -1, 5]"], 2, ["token id -1", "vocabulary [0, 256)"]),
    (["[1, 2]", "", "[]"], 3, ["empty prompt"]),
    (["[1, 2.5]"], 1, ["integers", "2.5"]),
    (["[1, 2", "[3]"], 1, ["not JSON"]),
])
def test_bad_jsonl_prompts_name_the_line(checkpoint, tmp_path, capsys, lines, line, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["generate", "--checkpoint", checkpoint, "--tokens", str(path), "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for needle in [f"{path}, line {line}:", *needles]:
        assert needle in err[0], (needle, err[0])


@pytest.mark.parametrize("extra, needles", [
    (["--eos-id", "x"], ["--eos-id x", "token id"]),
    (["--eos-id", "256"], ["--eos-id 256", "vocabulary"]),
    (["--eos-id", "none", "--eos-id", "3"], ["--eos-id none"]),
    (["--pad-id", "-1"], ["--pad-id -1", "vocabulary"]),
])
def test_bad_stop_and_pad_ids(checkpoint, tmp_path, capsys, extra, needles):
    path = tmp_path / "ok.jsonl"
    path.write_text("[1, 2]\n")
    code = main(["generate", "--checkpoint", checkpoint, "--tokens", str(path), "--max-new-tokens", "2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_empty_jsonl_and_fewer_prompts_than_ranks(checkpoint, tmp_path, capsys):
    """No prompts is a user error; fewer prompts than ranks is not (a rank with none serves its experts)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["generate", "--checkpoint", checkpoint, "--tokens", str(empty), "--max-new-tokens", "2"]) == 2
    assert "no prompts" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text("[1, 2]\n")
    assert main(["generate", "--checkpoint", checkpoint, "--tokens", str(one), "--max-new-tokens", "2",
                 "--world-size", "2", "--eos-id", "none"]) == 0
    alone = load_pretrained(checkpoint).generate(torch.tensor([[1, 2]]), max_new_tokens=2, eos_token_id=[])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == alone[0].tolist()


def test_left_pad_and_generated_part():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad(np.array([[1, 2], [3, 4]]), pad_id=9)
    assert ids.dtype == torch.int64 and ids.tolist() == [[1, 2], [3, 4]] and mask is None  # no padding, no mask
    assert generated_part([5, 7, 2, 2], [2]) == [5, 7, 2]  # up to and including the first stop; the fill dropped
    assert generated_part([5, 7, 8], [2]) == [5, 7, 8] and generated_part([5, 2], []) == [5, 2]
