"""Sampled decoding against its definition: temperature, top-k, top-p, seeds, and `moeport generate --sample`.

`pick_next_token` draws from softmax(logits / temperature), restricted to the
`top_k` most likely tokens (0: all), then to the smallest set of the most likely
whose probability reaches `top_p` (at least one), renormalised after each step. Each test draws
many times from fixed logits with a fixed seed and compares the empirical
distribution with that definition, computed here in float64: the draws are
deterministic, and the bound on the total-variation distance is several times
what sampling noise gives, so the tests cannot flake, yet far below the distance
between the distribution under test and any of its plausible mistakes (each
test checks that too, so a bound that could not tell them apart would fail).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli
from moeport.model.generation import pick_next_token

DRAWS = 40_000
#: Sampling noise in the total-variation distance of 40k draws over <= 8 tokens is about 0.005.
BOUND = 0.02
#: Probabilities of six tokens, deliberately not in order, so that "the best" is not "the first".
PROBS = torch.tensor([0.06, 0.4, 0.1, 0.04, 0.25, 0.15], dtype=torch.float64)
LOGITS = PROBS.log().to(torch.float32) + 3.0  # logits, not log-probabilities: softmax must normalise them


def definition(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling must follow, for one row of logits, in float64."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: top_k or len(probs)]] = True
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    if top_p < 1.0:
        total, smallest = 0.0, torch.zeros_like(keep)
        for index in order.tolist():  # the most likely first, until the kept mass reaches top_p (one at least)
            if total >= top_p and smallest.any():
                break
            smallest[index] = True
            total += float(probs[index])
        probs = torch.where(smallest, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def empirical(logits: torch.Tensor, seed: int = 0, draws: int = DRAWS, **options) -> torch.Tensor:
    """How often each token is picked in `draws` independent draws from one row of logits."""
    generator = torch.Generator().manual_seed(seed)
    picked = pick_next_token(logits.expand(draws, -1), True, generator=generator, **{
        "temperature": 1.0, "top_k": 0, "top_p": 1.0, **options})
    assert picked.shape == (draws, 1) and picked.dtype == torch.int64
    return torch.bincount(picked[:, 0], minlength=logits.shape[-1]).double() / draws


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance of two distributions."""
    return 0.5 * float((p - q).abs().sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_draws_follow_the_softmax_of_the_logits_over_the_temperature(temperature):
    want = definition(LOGITS, temperature)
    got = empirical(LOGITS, seed=1, temperature=temperature)
    assert tv(got, want) <= BOUND, (got, want)
    for other in {0.5, 1.0, 2.5} - {temperature}:  # the bound tells temperatures apart
        assert tv(got, definition(LOGITS, other)) > 3 * BOUND
    assert tv(got, torch.nn.functional.one_hot(LOGITS.argmax(), 6).double()) > 3 * BOUND  # not greedy


def test_temperature_sharpens_below_one_and_flattens_above():
    shares = {t: empirical(LOGITS, seed=2, temperature=t) for t in (0.01, 0.3, 1.0, 3.0, 1000.0)}
    best = int(LOGITS.argmax())
    assert shares[0.01][best] == 1.0  # nearly zero: the most likely token every time
    tops = [float(shares[t][best]) for t in (0.3, 1.0, 3.0)]
    assert tops[0] > tops[1] + 0.1 and tops[1] > tops[2] + 0.1, tops

    def entropy(p):
        return float(-(p[p > 0] * p[p > 0].log()).sum())
    entropies = [entropy(shares[t]) for t in (0.01, 0.3, 1.0, 3.0)]
    assert entropies == sorted(entropies) and len(set(entropies)) == 4, entropies
    assert tv(shares[1000.0], torch.full((6,), 1 / 6, dtype=torch.float64)) <= BOUND  # very hot: uniform


@pytest.mark.parametrize("top_k", [1, 2, 4, 6, 50])
def test_top_k_keeps_only_the_k_best_at_their_relative_odds(top_k):
    got = empirical(LOGITS, seed=3, top_k=top_k)
    best = set(LOGITS.argsort(descending=True)[:top_k].tolist())
    assert set(got.nonzero()[:, 0].tolist()) == best  # every one of the k best is drawn, nothing else
    want = definition(LOGITS, top_k=top_k)
    assert tv(got, want) <= BOUND, (got, want)
    if top_k < 6:  # the bound tells the restriction apart from none
        assert tv(got, definition(LOGITS)) > 3 * BOUND


@pytest.mark.parametrize("top_p, kept", [
    (0.0, 1),   # nothing to reach: the most likely token alone, as for any tiny top_p
    (0.3, 1),   # 0.4 alone reaches it
    (0.5, 2),   # 0.4 + 0.25
    (0.7, 3),   # + 0.15 = 0.8
    (0.85, 4),  # + 0.1 = 0.9
    (0.93, 5),  # + 0.06 = 0.96
    (0.99, 6),
    (1.0, 6),
])
def test_top_p_keeps_the_smallest_set_of_the_most_likely_that_reaches_p(top_p, kept):
    got = empirical(LOGITS, seed=4, top_p=top_p)
    most_likely = set(PROBS.argsort(descending=True)[:kept].tolist())
    assert set(got.nonzero()[:, 0].tolist()) == most_likely
    want = definition(LOGITS, top_p=top_p)
    assert tv(got, want) <= BOUND, (got, want)
    if kept < 5:  # the bound tells the cut apart from none (dropping only the 0.04 token, the support does)
        assert tv(got, definition(LOGITS)) > 3 * BOUND


def test_temperature_then_top_k_then_top_p():
    """The steps in their order, each renormalising: at temperature 2 the probabilities flatten, the four best keep
    0.83 of the mass, and top_p = 0.7 of those is reached by three. Any other order keeps another set: top_p at
    temperature 1 keeps two, top_p before the top-k cut (or without it) keeps four."""
    options = {"temperature": 2.0, "top_k": 4, "top_p": 0.7}
    want = definition(LOGITS, **options)
    assert int((want > 0).sum()) == 3
    assert int((definition(LOGITS, top_k=4, top_p=0.7) > 0).sum()) == 2
    assert int((definition(LOGITS, temperature=2.0, top_p=0.7) > 0).sum()) == 4
    got = empirical(LOGITS, seed=5, **options)
    assert set(got.nonzero()[:, 0].tolist()) == set(want.nonzero()[:, 0].tolist())
    assert tv(got, want) <= BOUND, (got, want)


def test_each_row_of_a_batch_draws_from_its_own_logits():
    rows = torch.stack([LOGITS, LOGITS.flip(0), torch.zeros(6)])
    generator = torch.Generator().manual_seed(6)
    picked = pick_next_token(rows.repeat(DRAWS // 4, 1), True, 1.0, 0, 1.0, generator).view(-1, 3)
    for row in range(3):
        got = torch.bincount(picked[:, row], minlength=6).double() / picked.shape[0]
        assert tv(got, definition(rows[row])) <= 2 * BOUND, (row, got)


def test_equal_seeds_repeat_and_different_seeds_differ():
    def draws(seed, **options):
        return pick_next_token(LOGITS.expand(200, -1), True, generator=torch.Generator().manual_seed(seed), **{
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, **options})

    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))
    assert torch.equal(draws(7, top_k=3, top_p=0.9), draws(7, top_k=3, top_p=0.9))
    assert not torch.equal(draws(7, top_k=3, top_p=0.9), draws(8, top_k=3, top_p=0.9))


def test_without_sampling_the_options_change_nothing():
    rows = torch.stack([LOGITS, LOGITS.flip(0)])
    for options in [(1.0, 0, 1.0), (5.0, 3, 0.5), (0.1, 1, 0.01)]:
        assert pick_next_token(rows, False, *options, None).tolist() == [[1], [4]]


CLI_OPTIONS = {"do_sample": True, "temperature": 0.7, "top_k": 30, "top_p": 0.5, "seed": 7}


def test_cli_generate_sample_gives_the_python_apis_tokens(checkpoint, tokens, tmp_path):
    """One rank: the ranks of a larger world each sample their own rows with the same seed."""
    from moeport.model import load_pretrained

    out = tmp_path / "ids.npy"
    result = run_cli("generate", "--checkpoint", checkpoint, "--tokens", tokens, "--max-new-tokens", "4", "--sample",
                     "--temperature", "0.7", "--top-k", "30", "--top-p", "0.5", "--seed", "7", "--world-size", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    got = torch.from_numpy(np.load(out))
    model = load_pretrained(checkpoint)
    ids = torch.from_numpy(np.load(tokens))

    def api(**changes):
        return model.generate(ids, max_new_tokens=4, **{**CLI_OPTIONS, **changes})

    assert torch.equal(got, api())
    # each option reached the sampler: with any one of them at its default, the tokens differ (checked for these
    # options on the session's checkpoint and tokens; the draws are deterministic)
    for changes in ({"temperature": 1.0}, {"top_k": 0}, {"top_p": 1.0}, {"seed": 0}, {"do_sample": False}):
        assert not torch.equal(got, api(**changes)), changes
