"""Batches of different lengths in one process: attention masks, per-sequence positions and caches, stop tokens."""

from __future__ import annotations

import json

import pytest
import torch

from moeport.model import PRESETS, LongcatForCausalLM, load_pretrained
from moeport.model.generation import GenerationDefaults
from moeport.model.token_layout import token_layout
from reference import load_reference

pytest.importorskip("transformers")

LENGTHS = [9, 3, 6, 1]


def ragged(lengths=LENGTHS, seed=11):
    """Prompts of `lengths` (a list of 1-D tensors) and their left-padded batch: (prompts, ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return prompts, ids, mask


def test_padded_batch_gives_each_sequence_its_own_logits(checkpoint):
    """Each sequence's logits are those of the sequence run alone (1e-5); against transformers' padded run the bound
    is 1e-5 of the logits' scale (about 5 here): unpadded, the two implementations already differ by up to ~1.1e-5
    (their kernels sum in other orders), so padding is judged against this model's own unpadded run."""
    model, reference = load_pretrained(checkpoint), load_reference(checkpoint)
    prompts, ids, mask = ragged()
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # transformers' generate counts real tokens the same way
        want = reference(ids, attention_mask=mask, position_ids=positions).logits
        scale = want[mask.bool()].abs().max().item()
        assert scale > 1.0
        assert (got - want)[mask.bool()].abs().max().item() <= 1e-5 * scale
        for row, prompt in enumerate(prompts):  # and each sequence alone, unpadded
            alone = model(prompt[None])[0]
            assert (got[row, -len(prompt):] - alone).abs().max().item() <= 1e-5


def test_cache_keeps_a_length_per_sequence_and_decodes_each_as_alone(checkpoint):
    model = load_pretrained(checkpoint)
    prompts, ids, mask = ragged()
    with torch.no_grad():
        caches = model.new_caches(len(prompts), ids.shape[1] + 3)
        model(ids, caches, attention_mask=mask)
        assert caches.lengths == LENGTHS  # padding is not cached
        steps = torch.tensor([[5], [6], [7], [8]])
        chunk = torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])
        decoded = model(steps, caches)[:, 0]
        chunked = model(chunk, caches)  # a chunk of two positions after caches of different lengths
        assert caches.lengths == [n + 3 for n in LENGTHS]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, steps[row], chunk[row]])[None])[0]
            assert (decoded[row] - alone[len(prompt)]).abs().max().item() <= 1e-5
            assert (chunked[row] - alone[-2:]).abs().max().item() <= 1e-5


def test_padded_tokens_take_no_expert_slot(checkpoint):
    model = load_pretrained(checkpoint)
    _, ids, mask = ragged()
    seen = []
    for layer in model.model.layers:
        layer.routing_counts = torch.zeros(model.config.num_experts_total, dtype=torch.int64)
        prepare = layer.exchange.prepare
        layer.exchange.prepare = lambda tokens, routing, decoding, prepare=prepare: (seen.append(tokens.shape[0]),
                                                                                     prepare(tokens, routing, decoding))[1]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    real = int(mask.sum())
    assert seen == [real] * len(model.model.layers)  # only real rows are routed and dispatched
    for layer in model.model.layers:  # expert-load and zero-expert figures count real tokens only
        assert int(layer.routing_counts.sum()) == real * model.config.moe_topk


def test_greedy_generate_with_padding_and_stop_tokens_matches_reference(checkpoint):
    model, reference = load_pretrained(checkpoint), load_reference(checkpoint)
    prompts, ids, mask = ragged()
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), free)
    width = ids.shape[1]
    stop = int(free[1, width + 2])  # sequence 1 stops at its third token; the others run on or stop at it too
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=stop,
                              pad_token_id=1)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=stop, pad_token_id=1)
    assert torch.equal(got, want)
    assert (got[1, width + 3:] == 1).all()  # filled with the pad id after the stop token
    for row, prompt in enumerate(prompts):  # each as alone
        alone = model.generate(prompt[None], max_new_tokens=8, eos_token_id=stop, pad_token_id=1)[0, len(prompt):]
        assert torch.equal(got[row, width:width + len(alone)], alone)


def test_generate_returns_when_every_sequence_has_stopped(checkpoint):
    model = load_pretrained(checkpoint)
    _, ids, mask = ragged()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[])[:, -1].tolist()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1  # every sequence stopped at its first token


def test_stop_and_pad_ids_default_to_the_checkpoint(checkpoint, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "pad_token_id": 4}))
    assert GenerationDefaults.read(str(path)) == GenerationDefaults((7, 9), 4)
    model = load_pretrained(str(path))
    _, ids, mask = ragged()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, ids.shape[1] + 1])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": stop, "pad_token_id": 4}))
    model = load_pretrained(str(path))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6),
                       model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=stop, pad_token_id=4))
    assert LongcatForCausalLM(PRESETS["tiny"]).generation_defaults == GenerationDefaults()  # no checkpoint: none


def test_a_mask_of_ones_and_equal_lengths_take_the_uniform_path():
    assert token_layout(None, [0, 0], 2, 3, torch.device("cpu"), cached=False) is None
    assert token_layout(torch.ones(2, 3), [4, 4], 2, 3, torch.device("cpu"), cached=True) is None
    layout = token_layout(None, [4, 2], 2, 1, torch.device("cpu"), cached=True)
    assert layout is not None and layout.positions.tolist() == [[4], [2]] and layout.lengths_after == [5, 3]
    with pytest.raises(ValueError, match="attention_mask must be"):
        token_layout(torch.ones(2, 4), [0, 0], 2, 3, torch.device("cpu"), cached=False)
