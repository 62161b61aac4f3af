"""The expert-parallel model on real ranks against the reference, and the two schedules against each other."""

from __future__ import annotations

import pytest
import torch

from moeport.jobs import my_rows
from moeport.model import load_pretrained
from moeport.profile import load_profile
from moeport.testing import run_ranks
from reference import load_reference

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

BATCH, LENGTH, NEW = 5, 13, 6


def prompts():
    return torch.randint(0, 256, (BATCH, LENGTH), generator=torch.Generator().manual_seed(9))


RAGGED = [13, 4, 9, 1, 11]  # prompt lengths of a left-padded batch


def ragged_prompts():
    """A left-padded batch of prompts of lengths RAGGED: (ids, attention_mask) [BATCH, LENGTH]."""
    ids, mask = prompts(), torch.zeros(BATCH, LENGTH, dtype=torch.int64)
    for row, n in enumerate(RAGGED):
        ids[row, : LENGTH - n] = 0
        mask[row, LENGTH - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def expected(checkpoint):
    ref = load_reference(checkpoint)
    ids = prompts()
    with torch.no_grad():
        logits = ref(ids).logits
    tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ids, mask = ragged_prompts()
    with torch.no_grad():
        ragged_logits = ref(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    stop = int(free[2, LENGTH + 1])  # one sequence stops at its second token
    ragged_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=stop,
                                 pad_token_id=1)
    return logits, tokens, (ragged_logits, ragged_tokens, stop)


MODES = ("auto", "normal", "low_latency")


def _set_dispatch(model, mode):
    """Every layer's exchange in dispatch mode `mode` (a one-rank model has nothing to dispatch)."""
    for layer in model.model.layers:
        if hasattr(layer.exchange, "mode"):
            layer.exchange.mode = mode


def parallel_job(rt, path, stop):
    """On each rank: its rows' logits, decoding and one decode step under both schedules and every dispatch
    mode, and which dispatcher `auto` picks for prefill and for decoding."""
    model = load_pretrained(path, rt)
    rows = my_rows(BATCH, rt.rank, rt.world_size)
    ids = prompts()[rows]
    exchange = model.model.layers[0].exchange
    out = {"experts": (model.experts_here.start, len(model.experts_here))}
    with torch.no_grad():
        if hasattr(exchange, "mode"):
            out["auto picks"] = {phase: type(exchange.dispatcher_for(decoding)).__name__
                                 for phase, decoding in (("prefill", False), ("decoding", True))}
        for schedule in ("overlap", "sequential"):
            model.schedule = schedule
            for mode in MODES:
                _set_dispatch(model, mode)
                tag = f"{schedule}/{mode}"
                out[f"logits_{tag}"] = model(ids)
                out[f"tokens_{tag}"] = model.generate(ids, max_new_tokens=NEW)
                caches = model.new_caches(ids.shape[0], LENGTH + 2)
                model(ids, caches)
                out[f"decode_{tag}"] = model(out[f"tokens_{tag}"][:, LENGTH:LENGTH + 1], caches)
    out.update(ragged_checks(model, rows, stop))
    return out


def ragged_checks(model, rows, stop):
    """This rank's rows of the left-padded batch: logits with the mask, and generate with a stop token, under both
    schedules (the ranks hold different numbers of real tokens; a rank's sequences may all stop first)."""
    ids, mask = ragged_prompts()
    out = {}
    for schedule in ("overlap", "sequential"):
        model.schedule = schedule
        _set_dispatch(model, "auto")
        with torch.no_grad():
            out[f"ragged_logits_{schedule}"] = model(ids[rows], attention_mask=mask[rows])
        out[f"ragged_tokens_{schedule}"] = model.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=NEW,
                                                          eos_token_id=stop, pad_token_id=1)
    return out


def check(results, expected, world_size):
    logits, tokens, (ragged_logits, ragged_tokens, _) = expected
    _, mask = ragged_prompts()
    for rank, r in enumerate(results):
        rows = my_rows(BATCH, rank, world_size)
        real = mask[rows].bool()
        scale = ragged_logits[rows][real].abs().max().item() if real.any() else 1.0
        for schedule in ("overlap", "sequential"):  # padded batches: 1e-5 of the logits' scale (see test_ragged)
            assert (r[f"ragged_logits_{schedule}"] - ragged_logits[rows])[real].abs().max().item() <= 1e-5 * scale
            assert torch.equal(r[f"ragged_tokens_{schedule}"], ragged_tokens[rows]), schedule
        assert r["experts"] == (rank * 8 // world_size, 8 // world_size)
        assert (r["logits_overlap/auto"] - logits[rows]).abs().max().item() <= 1e-4
        assert torch.equal(r["tokens_overlap/auto"], tokens[rows])
        for key in ("logits", "tokens", "decode"):
            for schedule in ("overlap", "sequential"):
                for mode in MODES:  # bit-identical schedules and dispatch modes, prefill and decoding
                    assert torch.equal(r[f"{key}_{schedule}/{mode}"], r[f"{key}_overlap/auto"]), (key, schedule, mode)
        if world_size > 1:  # the same choice on every rank: decoding steps low-latency, prefill normal
            assert r["auto picks"] == {"prefill": "ExpertParallelDispatcher", "decoding": "LowLatencyDispatcher"}


CASES = [("cpu-gloo", 1), ("cpu-gloo", 2), ("cpu-gloo", 4), ("generic-cpu", 1), ("generic-cpu", 2), ("generic-cpu", 4), ("cpu-mpi", 2), ("cpu-mpi", 4)]


@pytest.mark.parametrize("profile, world_size", CASES)
def test_expert_parallel_matches_reference(checkpoint, expected, profile, world_size):
    if profile == "cpu-mpi":
        pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    results = run_ranks(parallel_job, world_size, profile, args=(checkpoint, expected[2][2]), timeout_s=240)
    check(results, expected, world_size)


def test_more_ranks_than_sequences(checkpoint, expected):
    """Ranks with no rows of their own still serve their experts."""
    profile = load_profile("cpu-gloo")
    results = run_ranks(one_row_job, 4, profile, args=(checkpoint,), timeout_s=240)
    logits = expected[0]
    assert (results[0] - logits[:1]).abs().max().item() <= 1e-4
    assert all(r.shape[0] == 0 for r in results[1:])


def one_row_job(rt, path):
    """Rank 0 alone has a sequence: its logits, the same bits in both dispatch modes (the other ranks send nothing)."""
    model = load_pretrained(path, rt)
    ids = prompts()[:1] if rt.rank == 0 else prompts()[:0]
    with torch.no_grad():
        logits = model(ids)
        _set_dispatch(model, "low_latency")
        assert torch.equal(model(ids), logits)
        return logits


def generate_first_job(rt, path):
    """A fresh expert-parallel model that decodes first (inference mode), then runs a no_grad forward."""
    model = load_pretrained(path, rt)
    ids = prompts()[my_rows(BATCH, rt.rank, rt.world_size)]
    tokens = model.generate(ids, max_new_tokens=2)
    with torch.no_grad():
        return tokens, model(ids)


def test_buffers_made_while_decoding_do_not_break_a_later_forward(checkpoint, expected):
    logits, tokens, _ = expected
    results = run_ranks(generate_first_job, 2, load_profile("cpu-gloo"), args=(checkpoint,), timeout_s=240)
    for rank, (got_tokens, got_logits) in enumerate(results):
        rows = my_rows(BATCH, rank, 2)
        assert torch.equal(got_tokens, tokens[rows, : LENGTH + 2])
        assert (got_logits - logits[rows]).abs().max().item() <= 1e-4
