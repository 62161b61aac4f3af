"""How FFN-expert slots reach the experts and come back: the expert exchange a layer's MoE steps use.

One protocol, two implementations: `LocalExchange` when this rank holds every FFN
expert (nothing travels), `ParallelExchange` over an expert-parallel group (the
dispatcher's preprocess / communicate / postprocess steps, so that the layer's Issue
step starts the communication and its Wait step finishes it).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moeport.collectives.base import Communicator, CompletedHandle, Handle, MappedHandle
from moeport.collectives.expert_layout import ExpertLayout
from moeport.collectives.expert_parallel import ExpertInput, ExpertParallelDispatcher
from moeport.model.experts import ExpertFFNs
from moeport.model.router import Routing, ffn_slots


class ExpertExchange(Protocol):
    """Moves one layer's FFN-expert slots to the experts and their outputs back; one exchange in flight."""

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> Handle:
        """Start sending the FFN-expert slots of tokens [T, hidden]; the Handle gives what this rank's experts get."""

    def compute(self, experts: ExpertFFNs, received: Any) -> torch.Tensor:
        """This rank's experts on what arrived: one weighted-sum row per received row."""

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """Start sending the expert outputs back; the Handle gives [T, hidden] in this rank's token order."""


class LocalExchange:
    """The expert exchange when this rank holds every FFN expert: nothing travels."""

    def __init__(self, n_routed_experts: int) -> None:
        self.n_routed_experts = n_routed_experts

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> Handle:
        """The FFN-expert slots of each token, as (rows, local ids, weights)."""
        return CompletedHandle((tokens, ffn_slots(routing, self.n_routed_experts), routing.weights))

    def compute(self, experts: ExpertFFNs, received: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The weighted expert outputs, one row per received row."""
        return experts(*received)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """The expert outputs back in token order (already there)."""
        return CompletedHandle(expert_out)


class ParallelExchange:
    """Dispatch and combine over an expert-parallel group, through the dispatcher's split steps."""

    def __init__(self, ep: Communicator, layout: ExpertLayout) -> None:
        self.dispatcher = ExpertParallelDispatcher(ep, layout.n_routed_experts)
        self._received: ExpertInput | None = None

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> Handle:
        """Route and pack (local), then issue the counts and the payload; the Handle gives this rank's ExpertInput."""
        plan = self.dispatcher.dispatch_preprocess(tokens, routing.ids, routing.weights)
        arriving = self.dispatcher.token_dispatch(plan, async_op=True)
        return MappedHandle(arriving, lambda received: self.dispatcher.dispatch_postprocess(plan, received))

    def compute(self, experts: ExpertFFNs, received: ExpertInput) -> torch.Tensor:
        """This rank's experts on the rows it received: one weighted-sum row per received row."""
        self._received = received
        return experts(received.hidden, received.local_ids, received.weights)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """Issue the expert outputs' way back; the Handle gives [T, hidden] in this rank's token order."""
        assert self._received is not None
        received, self._received = self._received, None
        back = self.dispatcher.token_combine(received, expert_out, async_op=True)
        return MappedHandle(back, lambda rows: self.dispatcher.combine_postprocess(received, rows))


def new_exchange(ep: Communicator, layout: ExpertLayout) -> ExpertExchange:
    """The exchange for a layer: local when the expert-parallel group is this rank alone."""
    return LocalExchange(layout.n_routed_experts) if layout.ep_size == 1 else ParallelExchange(ep, layout)
