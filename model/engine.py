"""Continuous batching: an engine that decodes a changing set of sequences, requests joining and leaving between steps.

    engine = Engine(model, max_batch=8, max_length=512)
    rid = engine.add(prompt_ids, max_new_tokens=32)
    for done in engine.run():                  # or: while engine.has_work(): engine.step()
        print(done.id, done.tokens, done.reason)

The engine holds one decoding cache of `max_batch` slots of `max_length` positions;
a request takes a free slot when it joins and gives it back when it finishes. One
`step()`:

1. admit waiting requests (first come, first served) into free slots, while the
   joiners' padded prefill (joiners x longest joiner prompt) fits `max_prefill_tokens`
   (at least one where a slot is free);
2. agree with the other expert-parallel ranks, in one small all_reduce of
   [joiners here, live sequences here], on whether any rank prefills and whether any
   rank decodes in this step;
3. prefill, if any rank does: the joiners, left-padded, in a cache of their own, whose
   rows then move into their slots; each joiner's first token comes from its prefill;
4. decode, if any rank does: one position for every live slot (the joiners of this
   step included, so a joiner gets its first two tokens in the step it joins), free
   slots being padding (never cached, attended to or sent to an expert);
5. a request that produced one of its stop tokens or reached its max_new_tokens is
   finished: its slot is emptied for the next joiner, and step() returns it.

Under expert parallelism each rank has its own Engine and its own requests (data-
parallel attention), while every forward is a collective (the experts' exchange). So
every rank runs the same phases in the same step, a rank with nothing to run in a phase
running an empty forward, and every rank must call step() the same number of times
(`run()` does: it steps until no rank has work).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Sequence

import torch

from moeport.model.generation import FROM_CHECKPOINT, left_pad, pick_next_token, seeded_generator, stop_and_pad

if TYPE_CHECKING:
    from moeport.model.lm import LongcatForCausalLM

#: The padded prefill tokens (joiners x longest joiner prompt) one step admits, by default.
PREFILL_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens: greedy by default; with `do_sample`, `temperature`, then the `top_k` most
    likely tokens (0: all) and the smallest set reaching `top_p`, drawn from a generator seeded with `seed` (None:
    torch's initial seed), as LongcatForCausalLM.generate does."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclasses.dataclass
class FinishedRequest:
    """A request that is done: its id (from `Engine.add`), its prompt, the tokens it generated (the stop token
    included where one was hit) and why it ended: "stop" (a stop token) or "length" (max_new_tokens)."""

    id: int
    prompt: list[int]
    tokens: list[int]
    reason: str


@dataclasses.dataclass
class _Request:
    """A request in the engine: waiting, or live in `slot`."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    stops: frozenset[int]
    generator: torch.Generator | None
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1


def _low_latency_room(model: "LongcatForCausalLM") -> tuple[int | None, int | None]:
    """The most real tokens per rank a decoding step and a prefill may hold (None: no bound), from the
    low-latency dispatch's room, where the model's expert exchange uses that dispatch in that phase."""
    modes = {getattr(layer.exchange, "mode", None) for layer in model.model.layers} - {None}
    room = model.context.max_tokens_per_rank
    decode = room if modes & {"auto", "low_latency"} else None
    return decode, (room if "low_latency" in modes else None)


class Engine:
    """Continuous batching over `model`: up to `max_batch` sequences of up to `max_length` positions (prompt and
    generated tokens) decode together, requests joining between steps and leaving when done.

    `max_prefill_tokens` bounds one step's padded prefill (default PREFILL_TOKENS, or the low-latency dispatch's
    room where prefill takes it). Under expert parallelism build one Engine per rank, each with its own requests,
    and call step() (or run()) on every rank alike. Raises ValueError where a decoding step of `max_batch`
    sequences would not fit the low-latency dispatch (moe.max_tokens_per_rank).
    """

    def __init__(self, model: "LongcatForCausalLM", max_batch: int, max_length: int,
                 max_prefill_tokens: int | None = None) -> None:
        decode_room, self._prefill_room = _low_latency_room(model)
        if max_prefill_tokens is None:
            max_prefill_tokens = min(PREFILL_TOKENS, self._prefill_room or PREFILL_TOKENS)
        for name, value in (("max_batch", max_batch), ("max_length", max_length),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if decode_room is not None and max_batch > decode_room:
            raise ValueError(f"max_batch {max_batch} exceeds moe.max_tokens_per_rank {decode_room}, the low-latency "
                             "dispatch's room for a decoding step; raise it or use moe.dispatch: normal")
        if self._prefill_room is not None and max_prefill_tokens > self._prefill_room:
            raise ValueError(f"max_prefill_tokens {max_prefill_tokens} exceeds moe.max_tokens_per_rank "
                             f"{self._prefill_room}, the low-latency dispatch's room for a prefill")
        self.model = model
        self.max_batch, self.max_length, self.max_prefill_tokens = max_batch, max_length, max_prefill_tokens
        with torch.inference_mode():
            self.caches = model.new_caches(max_batch, max_length)
        self._slots: list[_Request | None] = [None] * max_batch
        self._waiting: collections.deque[_Request] = collections.deque()
        self._next_id = 0
        self._busy = False  # whether any rank had work at the start of the last step

    def add(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None,
            eos_token_id: int | Sequence[int] | None = FROM_CHECKPOINT) -> int:
        """Queue a request; it joins at a coming step. Returns its id.

        `prompt_ids`: token ids (a list, or a 1-D tensor); `sampling`: default greedy; `eos_token_id`: the stop
        ids (one or a list; None: the checkpoint's; an empty list: none). Raises ValueError for an empty prompt,
        max_new_tokens < 1, or a prompt and max_new_tokens longer than max_length.
        """
        prompt = self._prompt_list(prompt_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens and max_new_tokens {max_new_tokens} exceed the "
                             f"engine's max_length {self.max_length}")
        if self._prefill_room is not None and len(prompt) > self._prefill_room:
            raise ValueError(f"a prompt of {len(prompt)} tokens exceeds moe.max_tokens_per_rank "
                             f"{self._prefill_room}, the low-latency dispatch's room for a prefill")
        sampling = sampling or Sampling()
        stops = frozenset(stop_and_pad(self.model.generation_defaults, eos_token_id, None)[0])
        request = _Request(self._next_id, prompt, max_new_tokens, sampling, stops, self._generator(sampling))
        self._next_id += 1
        self._waiting.append(request)
        return request.id

    @property
    def live(self) -> list[int]:
        """The ids of this rank's live requests (those holding a slot), by slot."""
        return [r.id for r in self._slots if r is not None]

    @property
    def waiting(self) -> list[int]:
        """The ids of this rank's requests waiting for a slot, in the order they will join."""
        return [r.id for r in self._waiting]

    def has_work(self) -> bool:
        """Whether this rank has requests waiting or live."""
        return bool(self._waiting) or any(r is not None for r in self._slots)

    def step(self) -> list[FinishedRequest]:
        """One step (see the module docstring): admit, prefill the joiners, decode every live sequence one
        position; returns the requests that finished in it. Every expert-parallel rank must call it alike."""
        with torch.inference_mode():
            joiners = self._admit()
            live = sum(r is not None for r in self._slots)  # the joiners included
            prefill, decode = self._agree(len(joiners), live)
            self._busy = prefill or decode
            finished = self._prefill(joiners) if prefill else []
            if decode:
                finished += self._decode()
        return finished

    def run(self) -> list[FinishedRequest]:
        """Step until no rank has work; every request that finished, in the order they did. Under expert
        parallelism every rank calls it together (it ends on every rank at the same step)."""
        finished: list[FinishedRequest] = []
        while True:
            finished += self.step()
            if not self._busy:
                return finished

    # -- the parts of a step ----------------------------------------------------------------------------------
    def _prompt_list(self, prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
        """The prompt as a list of ids, checked: 1-D, not empty, ids within the vocabulary."""
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids must be 1-D, got shape {list(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty; a request needs at least one prompt token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt_ids must lie in [0, {vocab}), got ids from {min(prompt)} to {max(prompt)}")
        return prompt

    def _generator(self, sampling: Sampling) -> torch.Generator | None:
        """A sampled request's own generator, seeded (None for a greedy one)."""
        return seeded_generator(self.model.device, sampling.seed) if sampling.do_sample else None

    def _admit(self) -> list[_Request]:
        """Move waiting requests into free slots (first come, first served) while their padded prefill fits
        max_prefill_tokens; at least one where a slot is free. Returns the joiners."""
        free = [slot for slot, r in enumerate(self._slots) if r is None]
        joiners: list[_Request] = []
        longest = 0
        while self._waiting and len(joiners) < len(free):
            width = max(longest, len(self._waiting[0].prompt))
            if joiners and (len(joiners) + 1) * width > self.max_prefill_tokens:
                break
            request = self._waiting.popleft()
            request.slot, longest = free[len(joiners)], width
            self._slots[request.slot] = request
            joiners.append(request)
        return joiners

    def _agree(self, joiners: int, live: int) -> tuple[bool, bool]:
        """Whether any expert-parallel rank prefills, and whether any decodes, in this step."""
        counts = torch.tensor([joiners, live], dtype=torch.int64, device=self.model.device)
        ep = self.model.context.ep
        if ep.world_size > 1:
            counts = ep.all_reduce(counts)
        anyone_joins, anyone_live = counts.tolist()
        return anyone_joins > 0, anyone_live > 0

    def _empty_forward(self, decoding: bool) -> None:
        """A forward of no sequences: this rank's part in a step's collectives when it has nothing to run."""
        self.model(torch.zeros(0, 1, dtype=torch.int64, device=self.model.device), decoding=decoding)

    def _prefill(self, joiners: list[_Request]) -> list[FinishedRequest]:
        """The joiners' prompts, left-padded in a cache of their own; their first tokens; their cache rows into
        their slots (a joiner finished at its first token leaves at once)."""
        if not joiners:
            self._empty_forward(decoding=False)
            return []
        device = self.model.device
        ids, mask = left_pad([r.prompt for r in joiners], pad_id=0)
        own = self.model.new_caches(len(joiners), ids.shape[1])
        logits = self.model(ids.to(device), own, logits_to_keep=1, decoding=False,
                            attention_mask=None if mask is None else mask.to(device))
        tokens = self._pick(logits[:, -1], joiners)
        slots = [r.slot for r in joiners]  # before _finish frees any
        finished, keep = [], []
        for row, (request, token) in enumerate(zip(joiners, tokens)):
            done = self._finish(request, token)
            if done is not None:
                finished.append(done)
            else:
                keep.append(row)
        if keep:
            self.caches.copy_in([slots[row] for row in keep], own, keep)
        return finished

    def _decode(self) -> list[FinishedRequest]:
        """One position for every live slot (free slots are padding); the requests that finished with it."""
        live = [r for r in self._slots if r is not None]
        if not live:  # every joiner here finished at its first token, or none was live
            if self.model.context.ep.world_size > 1:
                self._empty_forward(decoding=True)
            return []
        device = self.model.device
        ids = torch.zeros(self.max_batch, 1, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for request in live:
            ids[request.slot, 0] = request.tokens[-1]
            mask[request.slot, 0] = 1
        logits = self.model(ids.to(device), self.caches, logits_to_keep=1, attention_mask=mask.to(device),
                            decoding=True)
        rows = torch.tensor([r.slot for r in live], device=device)
        tokens = self._pick(logits[:, -1].index_select(0, rows), live)
        return [done for done in map(self._finish, live, tokens) if done is not None]

    @staticmethod
    def _pick(logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """Each request's next token from its row of logits [N, vocab]: greedy rows in one argmax, sampled rows
        each with its own generator."""
        tokens = [0] * len(requests)
        greedy = [i for i, r in enumerate(requests) if not r.sampling.do_sample]
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            for i, token in zip(greedy, logits.index_select(0, index).argmax(dim=-1).tolist()):
                tokens[i] = token
        for i, request in enumerate(requests):
            s = request.sampling
            if s.do_sample:
                tokens[i] = int(pick_next_token(logits[i:i + 1], True, s.temperature, s.top_k, s.top_p,
                                                request.generator))
        return tokens

    def _finish(self, request: _Request, token: int) -> FinishedRequest | None:
        """Record a request's new token; if it ends the request, free its slot and return it finished."""
        request.tokens.append(token)
        if token in request.stops:
            reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            reason = "length"
        else:
            return None
        self._slots[request.slot] = None
        self.caches.reset(request.slot)
        return FinishedRequest(request.id, request.prompt, request.tokens, reason)
