"""Continuous batching (model/engine.py): requests joining and leaving a decoding batch, in one process and on
expert-parallel ranks, each request's tokens those of the request generated alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moeport.model import Engine, Sampling, load_pretrained
from moeport.testing import run_ranks

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

LENGTHS = [5, 9, 2, 7, 1, 4, 6, 3]  # the prompt lengths of the request pool
NEW = [6, 3, 8, 5, 4, 7, 5, 6]  # and their max_new_tokens
MAX_BATCH, MAX_LENGTH, PREFILL = 2, 20, 12  # an engine whose slots are reused and whose prefill budget binds


def prompts():
    g = torch.Generator().manual_seed(21)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def pool(checkpoint):
    """The requests (prompt, max_new_tokens, stop ids) and each one's tokens generated alone (greedy).

    Request 0 stops at (or before) its third token, 3 at its first (its prefill's), 5 at (or before) its second;
    7 takes the checkpoint's stop ids; the rest run to max_new_tokens."""
    model = load_pretrained(checkpoint)
    requests = []
    for i, (prompt, n) in enumerate(zip(prompts(), NEW)):
        free = alone(model, prompt, n, [])
        stop = {0: [free[2]], 3: [free[0]], 5: [free[1]], 7: None}.get(i, [])
        requests.append((prompt, n, stop))
    return requests, [alone(model, *request) for request in requests]


def alone(model, prompt, n, eos, **sampling):
    """The tokens model.generate gives a request run on its own."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=eos, **sampling)
    return out[0, len(prompt):].tolist()


def drive(engine, plan, requests, steps):
    """Add each planned request (pool index, step it joins at) before that step, step `steps` + 1 times, then run
    the rest: {pool index: (tokens, reason)}, and the live requests each late joiner found when it joined."""
    ids, finished, found = {}, [], {}
    for step in range(steps + 1):
        for index, join in plan:
            if join == step:
                if step > 0:
                    found[index] = list(engine.live)
                prompt, n, eos = requests[index][:3]
                ids[engine.add(prompt, n, *requests[index][3:], eos_token_id=eos)] = index
        finished += engine.step()
    finished += engine.run()
    assert not engine.has_work() and len(finished) == len(plan)
    return {ids[f.id]: (f.tokens, f.reason) for f in finished}, found


def check_against_alone(results, requests, want):
    for index, (tokens, reason) in results.items():
        assert tokens == want[index], index
        stops = requests[index][2] if requests[index][2] is not None else [2]  # the tiny checkpoint's stop id
        assert reason == ("stop" if tokens[-1] in stops else "length"), index
        assert reason == "stop" or len(tokens) == requests[index][1]


PLAN = [(0, 0), (1, 0), (2, 2), (3, 0), (4, 3), (5, 0), (6, 1), (7, 4)]


def test_requests_joining_and_leaving_decode_as_alone(checkpoint, pool):
    requests, want = pool
    engine = Engine(load_pretrained(checkpoint), max_batch=3, max_length=MAX_LENGTH, max_prefill_tokens=PREFILL)
    results, found = drive(engine, PLAN, requests, steps=4)
    check_against_alone(results, requests, want)
    assert sorted(results) == list(range(len(requests)))
    assert found[2] and found[7]  # late requests that joined while others were live
    assert [results[i][1] for i in (0, 3, 5)] == ["stop"] * 3  # finished early, giving their slots back
    assert engine.caches.batch == 3 and engine.caches.lengths == [0, 0, 0]  # 8 requests through 3 slots


def test_padded_tokens_never_reach_the_dispatch(checkpoint, pool):
    """Each forward routes exactly its real tokens: the joiners' prompts in a prefill, one per live sequence in a
    decoding step (free slots and left padding are not dispatched); a prefill of several joiners fits the budget."""
    requests, _ = pool
    model = load_pretrained(checkpoint)
    forwards, dispatched = [], [[] for _ in model.model.layers]
    forward = model.forward

    def counting_forward(ids, caches=None, logits_to_keep=0, attention_mask=None, decoding=None):
        real = ids.numel() if attention_mask is None else int(attention_mask.sum())
        forwards.append((decoding, real, tuple(ids.shape)))
        return forward(ids, caches, logits_to_keep, attention_mask, decoding)

    model.forward = counting_forward
    for layer, seen in zip(model.model.layers, dispatched):
        prepare = layer.exchange.prepare
        layer.exchange.prepare = lambda tokens, routing, decoding, prepare=prepare, seen=seen: (
            seen.append((decoding, tokens.shape[0])), prepare(tokens, routing, decoding))[1]
    results, _ = drive(Engine(model, 3, MAX_LENGTH, max_prefill_tokens=14), PLAN, requests, steps=4)
    for seen in dispatched:
        assert seen == [(decoding, real) for decoding, real, _ in forwards]
    prefill = [(real, shape) for decoding, real, shape in forwards if not decoding]
    decode = [(real, shape) for decoding, real, shape in forwards if decoding]
    assert sum(real for real, _ in prefill) == sum(LENGTHS)  # each prompt token once
    assert sum(real for real, _ in decode) == sum(len(tokens) - 1 for tokens, _ in results.values())
    assert all(shape == (3, 1) for _, shape in decode) and any(real < 3 for real, _ in decode)
    assert all(rows * width <= 14 for _, (rows, width) in prefill if rows > 1)
    assert any(real < rows * width for real, (rows, width) in prefill if rows > 1)  # a padded prefill


SAMPLED = Sampling(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)


def test_a_seeded_sampled_request_gives_the_same_tokens_whoever_runs_beside_it(checkpoint, pool):
    requests, _ = pool
    model = load_pretrained(checkpoint)
    prompt = prompts()[6]
    sampled = [(prompt, 9, [], SAMPLED), (prompt, 9, [], Sampling(do_sample=True, seed=8))]
    mixed = requests + sampled  # indices 8 (the seeded one) and 9 (another sampled one)
    first, _ = drive(Engine(model, 3, MAX_LENGTH), [(8, 0), (1, 0), (2, 0)], mixed, steps=0)
    second, _ = drive(Engine(model, 2, MAX_LENGTH), [(2, 0), (9, 0), (4, 1), (8, 2), (1, 2)], mixed, steps=2)
    assert first[8] == second[8]
    assert first[8][0] == alone(model, prompt, 9, [], do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    assert first[8][0] != alone(model, prompt, 9, [])  # sampled, not greedy


def test_stop_ids_default_to_the_checkpoint(checkpoint, pool, tmp_path):
    requests, want = pool
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    stop = want[1][1]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    engine = Engine(load_pretrained(str(path)), MAX_BATCH, MAX_LENGTH)
    engine.add(requests[1][0], 3)
    (done,) = engine.run()
    assert done.tokens == want[1][: want[1].index(stop) + 1] and done.reason == "stop"


def test_wrong_requests_are_refused(checkpoint):
    engine = Engine(load_pretrained(checkpoint), max_batch=2, max_length=10)
    assert engine.run() == [] and engine.step() == []  # no requests: nothing to do
    with pytest.raises(ValueError, match="max_length 10"):
        engine.add([5] * 8, max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        engine.add([], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        engine.add(torch.tensor([5, 6]), max_new_tokens=0)
    with pytest.raises(ValueError, match="1-D"):
        engine.add(torch.tensor([[5, 6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        engine.add([5, 256], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        Engine(engine.model, max_batch=0, max_length=10)
    assert not engine.has_work()


# -- expert parallel ------------------------------------------------------------------------------------------------
# Per world size, each rank's requests (pool index, step it joins at): different numbers per rank, a rank whose one
# request finishes in its first step, a rank with none at all, requests joining mid-run, a rank idle between two.
RANK_PLANS = {
    2: [[(0, 0), (1, 0), (2, 2), (3, 0), (6, 3)], [(5, 0), (4, 5)]],
    4: [[(0, 0), (1, 0), (2, 1), (6, 2)], [(5, 0)], [], [(3, 2), (4, 3), (7, 3)]],
}


def parallel_job(rt, path, requests, plans, modes):
    """This rank's requests through an Engine in each dispatch mode; and the refusals of what would not fit the
    low-latency dispatch's room: a max_batch larger (a decoding step), and where prefill takes it too, a prefill
    budget or a prompt larger."""
    model = load_pretrained(path, rt)
    room = model.context.max_tokens_per_rank
    out = {"refused": []}
    for mode in modes:
        set_dispatch(model, mode)
        engine = Engine(model, MAX_BATCH, MAX_LENGTH, PREFILL)
        out[mode] = drive(engine, plans[rt.rank], requests, steps=max(j for plan in plans for _, j in plan))[0]
        if mode == "low_latency":
            out["refused"] += [refusal(lambda: Engine(model, MAX_BATCH, 300, max_prefill_tokens=room + 1)),
                               refusal(lambda: Engine(model, MAX_BATCH, 300).add([5] * (room + 1), 1))]
    set_dispatch(model, "auto")
    out["refused"].append(refusal(lambda: Engine(model, room + 1, MAX_LENGTH)))
    return out


def set_dispatch(model, mode):
    for layer in model.model.layers:
        layer.exchange.mode = mode


def refusal(make):
    """The ValueError's message of `make()`."""
    with pytest.raises(ValueError) as error:
        make()
    return str(error.value)


def check_parallel(results, pool, plans, modes):
    requests, want = pool
    for rank, got in enumerate(results):
        assert len(got["refused"]) == (3 if "low_latency" in modes else 1)
        assert all("moe.max_tokens_per_rank 128" in message for message in got["refused"]), got["refused"]
        for mode in modes:
            assert sorted(got[mode]) == sorted(index for index, _ in plans[rank]), (rank, mode)
            check_against_alone(got[mode], requests, want)


@pytest.mark.parametrize("world_size, modes", [(2, ("auto", "low_latency")), (4, ("auto", "normal"))])
def test_expert_parallel_ranks_with_different_requests(checkpoint, pool, world_size, modes):
    plans = RANK_PLANS[world_size]
    results = run_ranks(parallel_job, world_size, "cpu-gloo", args=(checkpoint, pool[0], plans, modes),
                        timeout_s=240)
    check_parallel(results, pool, plans, modes)


def test_expert_parallel_over_mpi(checkpoint, pool):
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    plans = RANK_PLANS[2]
    results = run_ranks(parallel_job, 2, "cpu-mpi", args=(checkpoint, pool[0], plans, ("auto",)), timeout_s=240)
    check_parallel(results, pool, plans, ("auto",))
