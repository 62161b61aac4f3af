"""The model in one process against transformers' LongcatFlashForCausalLM, checkpoints, KV cache, counts."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

from moeport.base.errors import UserError
from moeport.model import PRESETS, load_pretrained, parameter_counts, save_pretrained
from reference import edit_checkpoint, load_reference, save_reference_checkpoint

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token_ids(batch=2, length=19, seed=3, vocab=256):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_reference(checkpoint):
    ids = token_ids()
    with torch.no_grad():
        want = load_reference(checkpoint)(ids).logits
        got = load_pretrained(checkpoint)(ids)
    assert want.abs().max() > 1.0  # far from uniform: the comparison means something
    assert (got - want).abs().max().item() <= 1e-4


HEAD_SIZES = {  # (qk_nope, qk_rope, v) head dims
    "v-short-by-less-than-nope": (16, 8, 16),  # the usual shape: v widened with k_nope's tail
    "v-short-by-more-than-nope": (4, 16, 8),  # v zero-padded
    "v-as-wide-as-qk": (16, 8, 24),
    "v-wider-than-qk": (4, 8, 16),
}


@pytest.mark.parametrize("head_dims", list(HEAD_SIZES.values()), ids=list(HEAD_SIZES))
def test_logits_match_reference_for_other_head_sizes(head_dims, tmp_path):
    nope, rope, v = head_dims
    config = dataclasses.replace(PRESETS["tiny"], qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v)
    path = save_reference_checkpoint(str(tmp_path / "ckpt"), config, seed=5)
    ids = token_ids(length=9)
    reference, ours = load_reference(path), load_pretrained(path)
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max() <= 1e-4
    want = reference.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(ours.generate(ids, max_new_tokens=5), want)  # the cached decoding path too


def test_greedy_generate_matches_reference(checkpoint):
    ids = token_ids(length=7)
    want = load_reference(checkpoint).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    got = load_pretrained(checkpoint).generate(ids, max_new_tokens=12)
    assert torch.equal(got, want)


def test_kv_cache_decoding_equals_recomputing(checkpoint):
    model = load_pretrained(checkpoint)
    ids = token_ids(length=9)
    generated = model.generate(ids, max_new_tokens=6)
    with torch.no_grad():
        full = model(generated)
        caches = model.new_caches(2, generated.shape[1])
        stepwise = [model(generated[:, :9], caches)]
        for pos in range(9, generated.shape[1]):
            stepwise.append(model(generated[:, pos:pos + 1], caches))
    torch.testing.assert_close(torch.cat(stepwise, dim=1), full, rtol=0, atol=1e-5)
    # chunked prefill (several new positions after a cached prefix) too
    with torch.no_grad():
        caches = model.new_caches(2, generated.shape[1])
        chunks = [model(generated[:, :5], caches), model(generated[:, 5:11], caches), model(generated[:, 11:], caches)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_rotation_table_grows_and_matches_computing_it_directly(checkpoint):
    from moeport.model.mla import rope_cos_sin

    model = load_pretrained(checkpoint)
    for start, length in [(0, 5), (250, 20), (600, 1), (3, 2)]:  # the table starts at 256 positions, then doubles
        got = model._rotation(start, length, torch.float32)
        want = rope_cos_sin(model.rope_inv_freq, torch.arange(start, start + length)[None], torch.float32)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (start, length)


def test_logits_to_keep_gives_the_last_positions(checkpoint):
    model = load_pretrained(checkpoint)
    ids = token_ids(length=7)
    with torch.no_grad():
        full, last, two = model(ids), model(ids, logits_to_keep=1), model(ids, logits_to_keep=2)
    assert last.shape == (2, 1, full.shape[-1]) and two.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(two, full[:, -2:], rtol=0, atol=1e-6)


def test_generate_and_forward_take_turns(checkpoint):
    """generate runs in inference mode; buffers it made are replaced, not written, by a later forward."""
    model = load_pretrained(checkpoint)
    ids = token_ids(length=6)
    first = model.generate(ids, max_new_tokens=3)
    first[:, 0] = 0  # an ordinary tensor: editable outside inference mode
    with torch.no_grad():
        logits = model(ids)
    again = model.generate(ids, max_new_tokens=3)
    with torch.no_grad():
        assert torch.equal(model(ids), logits)
    assert torch.equal(again[:, 1:], first[:, 1:]) and not again.is_inference()
    model(ids).sum().backward()  # with autograd too: nothing made in inference mode is saved for backward
    assert model.model.layers[0].self_attn[0].qkv_a_proj.grad is not None


def test_sampling_is_seeded_and_respects_top_k(checkpoint):
    """Sampled decoding through the KV cache: a seed repeats, another seed and greedy decoding differ, and a cut to
    the single best token is greedy. The sampler's distribution itself is tested in test_sampling.py."""
    model = load_pretrained(checkpoint)
    ids = token_ids(length=5)
    greedy = model.generate(ids, max_new_tokens=6)
    a = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, seed=11)
    b = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, seed=11)
    assert torch.equal(a, b) and a.shape == (2, 11) and torch.equal(a[:, :5], ids)
    assert not torch.equal(a, greedy)  # sampled: with these seeds and logits, some token is not the best one
    assert not torch.equal(a, model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, seed=12))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, seed=3), greedy)
    nucleus = model.generate(ids, max_new_tokens=1, do_sample=True, top_p=1e-6, seed=1)
    assert torch.equal(nucleus, greedy[:, :6])  # a tiny top_p is greedy


def test_schedules_agree_in_one_process(checkpoint):
    model = load_pretrained(checkpoint)
    ids = token_ids()
    with torch.no_grad():
        overlap = model(ids)
        model.schedule = "sequential"
        sequential = model(ids)
    assert torch.equal(overlap, sequential)


def test_save_and_reload_round_trip(checkpoint, tmp_path):
    model = load_pretrained(checkpoint)
    save_pretrained(model, str(tmp_path / "copy"))
    again = load_pretrained(str(tmp_path / "copy"))
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
        # the reference reads what we write
    assert not [f for f in os.listdir(tmp_path / "copy") if f.endswith(".tmp")]
    save_pretrained(model, str(tmp_path / "for-reference"), zero_expert_slots=True)
    with torch.no_grad():
        reread = load_reference(str(tmp_path / "for-reference"))(ids).logits
    torch.testing.assert_close(reread, model(ids), rtol=0, atol=1e-4)


def test_state_dict_uses_checkpoint_names_for_weights_stored_together(checkpoint):
    """q_a/kv_a and gate/up are held as one weight each, but the state dict shows and takes the checkpoint's tensors."""
    from safetensors import safe_open

    model = load_pretrained(checkpoint)
    state = model.state_dict()
    with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as f:
        for name in ("model.layers.0.self_attn.1.q_a_proj.weight", "model.layers.0.self_attn.1.kv_a_proj_with_mqa.weight",
                     "model.layers.1.mlps.0.gate_proj.weight", "model.layers.1.mlps.0.up_proj.weight"):
            assert torch.equal(state[name], f.get_tensor(name)), name
    assert not [name for name in state if "qkv_a_proj" in name or "gate_up_proj" in name]
    fresh = type(model)(model.config)
    fresh.load_state_dict(state, strict=True)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    state["model.layers.0.mlps.0.up_proj.weight"].fill_(0.5)  # the parts are views: writing them writes the model
    assert bool((model.model.layers[0].mlps[0].gate_up_proj[model.config.ffn_hidden_size:] == 0.5).all())


def test_zero_expert_slots_are_ignored_and_only_those(checkpoint, tmp_path):
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.mlp.experts.8.gate_proj.weight" in names  # transformers writes them
    stray = edit_checkpoint(checkpoint, tmp_path / "stray", lambda t: t.update({"model.layers.0.mlp.experts.8.down_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(UserError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.8\.down_proj\.weight"):
        load_pretrained(stray)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.self_attn.0.kv_b_proj.weight"), r"missing tensor model\.layers\.1\.self_attn\.0\.kv_b_proj\.weight"),
        (lambda t: t.pop("model.layers.0.mlp.experts.3.down_proj.weight"), r"missing tensor model\.layers\.0\.mlp\.experts\.3\.down_proj\.weight"),
        (lambda t: t.update({"model.norm.weight": torch.ones(65)}), r"model\.norm\.weight has shape \(65,\)"),
        (lambda t: t.update({"model.layers.0.mlps.1.up_proj.weight": torch.ones(128, 64, dtype=torch.int32)}), r"up_proj\.weight has dtype torch\.int32"),
        (lambda t: t.update({"model.layers.9.mlps.0.up_proj.weight": torch.ones(2)}), r"unexpected tensor model\.layers\.9\.mlps\.0\.up_proj\.weight"),
    ],
)
def test_bad_checkpoints_name_the_tensor(checkpoint, tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        load_pretrained(edit_checkpoint(checkpoint, tmp_path / "bad", edit))


def test_config_contradicting_tensors(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["expert_ffn_hidden_size"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"experts\.0\.gate_proj\.weight has shape \(32, 64\), config\.json implies \(48, 64\)"):
        load_pretrained(str(bad))


def test_longcat_flash_parameter_counts():
    config = PRESETS["longcat-flash"]
    total = parameter_counts(config)["total"]
    assert abs(total / 1e9 - 560.7) < 0.1
    assert abs(parameter_counts(config, 0)["active"] / 1e9 - 18.7) < 0.1
    assert abs(parameter_counts(config, 12)["active"] / 1e9 - 31.4) < 0.1


def test_model_names_no_device_or_collective_library():
    pattern = re.compile(r"cuda|nccl|gloo|\bmpi\b|mpi4py|torch\.distributed", re.IGNORECASE)
    offenders = []
    for name in sorted(os.listdir(os.path.join(REPO, "model"))):
        if name.endswith(".py"):
            for number, line in enumerate(open(os.path.join(REPO, "model", name)), 1):
                if pattern.search(line):
                    offenders.append(f"model/{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
