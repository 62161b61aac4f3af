"""How FFN-expert slots reach the experts and come back: the expert exchange a layer's MoE steps use.

One protocol, two implementations: `LocalExchange` when this rank holds every FFN
expert (nothing travels), `ParallelExchange` over an expert-parallel group (a
dispatcher's preprocess / communicate / postprocess steps, so that the layer's Issue
step starts the communication and its Wait step finishes it).

Over a group, a dispatch runs in one of two modes (a profile's `moe.dispatch`): normal
(the row counts first, then exactly the rows needed: collectives/expert_parallel.py) or
low-latency (fixed blocks of `moe.max_tokens_per_rank` rows per rank, one exchange each
way and no host synchronisation: collectives/low_latency.py). `auto` follows the phase,
which every rank shares: decoding steps low-latency, prefill normal. Both give
bit-identical results; gradients always take the normal mode, which has them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moeport.collectives.base import Communicator, CompletedHandle, Handle, MappedHandle
from moeport.collectives.expert_layout import ExpertLayout
from moeport.collectives.expert_parallel import ExpertInput, ExpertParallelDispatcher
from moeport.collectives.low_latency import LowLatencyDispatcher
from moeport.model.experts import ExpertFFNs
from moeport.model.router import Routing, ffn_slots

#: How a dispatch may travel (a profile's `moe.dispatch`).
DISPATCH_MODES = ("auto", "normal", "low_latency")


class ExpertExchange(Protocol):
    """Moves one layer's FFN-expert slots to the experts and their outputs back; one exchange in flight.

    A dispatch is two calls, so that a schedule can tell local work from communication:
    `prepare` (route and pack, local) and `dispatch` (start the communication).
    """

    def prepare(self, tokens: torch.Tensor, routing: Routing, decoding: bool = False) -> Any:
        """The local part of dispatching the FFN-expert slots of tokens [T, hidden] (of a decoding step, or
        not): what `dispatch` sends."""

    def dispatch(self, prepared: Any) -> Handle:
        """Start sending what `prepare` made; the Handle gives what this rank's experts get."""

    def compute(self, experts: ExpertFFNs, received: Any) -> torch.Tensor:
        """This rank's experts on what arrived: one weighted-sum row per received row."""

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """Start sending the expert outputs back; the Handle gives [T, hidden] in this rank's token order."""


class LocalExchange:
    """The expert exchange when this rank holds every FFN expert: nothing travels."""

    def __init__(self, n_routed_experts: int) -> None:
        self.n_routed_experts = n_routed_experts

    def prepare(self, tokens: torch.Tensor, routing: Routing, decoding: bool = False) -> Any:
        """The FFN-expert slots of each token, as (rows, local ids, weights)."""
        return tokens, ffn_slots(routing, self.n_routed_experts), routing.weights

    def dispatch(self, prepared: Any) -> Handle:
        """The slots, already where the experts are."""
        return CompletedHandle(prepared)

    def compute(self, experts: ExpertFFNs, received: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The weighted expert outputs, one row per received row."""
        return experts(*received)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """The expert outputs back in token order (already there)."""
        return CompletedHandle(expert_out)


class ParallelExchange:
    """Dispatch and combine over an expert-parallel group, through a dispatcher's split steps, in the mode
    `dispatch` (one of DISPATCH_MODES) picks for each step."""

    def __init__(self, ep: Communicator, layout: ExpertLayout, dispatch: str = "auto",
                 max_tokens_per_rank: int = 128) -> None:
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"unknown dispatch mode {dispatch!r}; expected one of {', '.join(DISPATCH_MODES)}")
        self.mode = dispatch
        self.normal = ExpertParallelDispatcher(ep, layout.n_routed_experts)
        self.low_latency = LowLatencyDispatcher(ep, layout, max_tokens_per_rank)
        self._in_flight: tuple[ExpertInput, ExpertParallelDispatcher | LowLatencyDispatcher] | None = None
        self._active: ExpertParallelDispatcher | LowLatencyDispatcher = self.normal

    def dispatcher_for(self, decoding: bool) -> ExpertParallelDispatcher | LowLatencyDispatcher:
        """The dispatcher a step uses: low-latency when forced, or under `auto` for a decoding step; normal for
        prefill, and whenever gradients are wanted."""
        low = self.mode == "low_latency" or (self.mode == "auto" and decoding)
        return self.low_latency if low and not torch.is_grad_enabled() else self.normal

    def prepare(self, tokens: torch.Tensor, routing: Routing, decoding: bool = False) -> Any:
        """The dispatcher's local preprocess (route and pack) in the mode this step takes: (dispatcher, plan)."""
        dispatcher = self.dispatcher_for(decoding)
        return dispatcher, dispatcher.dispatch_preprocess(tokens, routing.ids, routing.weights)

    def dispatch(self, prepared: Any) -> Handle:
        """Issue the exchange of a prepared dispatch; the Handle gives this rank's ExpertInput (postprocessed)."""
        dispatcher, plan = prepared
        self._active = dispatcher
        arriving = dispatcher.token_dispatch(plan, async_op=True)
        return MappedHandle(arriving, lambda received: dispatcher.dispatch_postprocess(plan, received))

    def compute(self, experts: ExpertFFNs, received: ExpertInput) -> torch.Tensor:
        """This rank's experts on the rows it received: one weighted-sum row per received row."""
        self._in_flight = (received, self._active)
        return experts(received.hidden, received.local_ids, received.weights)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """Issue the expert outputs' way back; the Handle gives [T, hidden] in this rank's token order."""
        assert self._in_flight is not None
        (received, dispatcher), self._in_flight = self._in_flight, None
        back = dispatcher.token_combine(received, expert_out, async_op=True)
        return MappedHandle(back, lambda rows: dispatcher.combine_postprocess(received, rows))


def new_exchange(ep: Communicator, layout: ExpertLayout, dispatch: str = "auto",
                 max_tokens_per_rank: int = 128) -> ExpertExchange:
    """The exchange for a layer: local when the expert-parallel group is this rank alone."""
    if layout.ep_size == 1:
        return LocalExchange(layout.n_routed_experts)
    return ParallelExchange(ep, layout, dispatch, max_tokens_per_rank)
