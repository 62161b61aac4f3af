"""The expert exchange under expert parallelism: FFN-expert slots to their ranks and back.

A thin adapter between the layer's steps and the expert-parallel dispatcher; the
communication itself is the dispatcher's (counts, then one uneven all_to_all each way).
"""

from __future__ import annotations

import torch

from moeport.collectives.base import Communicator, Handle
from moeport.collectives.expert_parallel import ExpertInput, ExpertParallelDispatcher
from moeport.model.config import LongcatConfig
from moeport.model.moe import ExpertFFNs, Routing


class ParallelExchange:
    """Dispatch/combine over an expert-parallel group; one per layer, one exchange in flight at a time."""

    def __init__(self, ep: Communicator, config: LongcatConfig, first_expert: int, expert_count: int) -> None:
        self.dispatcher = ExpertParallelDispatcher(ep, config.n_routed_experts)
        self._received: ExpertInput | None = None

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> Handle:
        """Issue the dispatch of the FFN-expert slots; the Handle gives this rank's ExpertInput."""
        return self.dispatcher.dispatch(tokens, routing.ids, routing.weights, async_op=True)

    def compute(self, experts: ExpertFFNs, received: ExpertInput) -> torch.Tensor:
        """This rank's experts on the rows it received: one weighted-sum row per received row."""
        self._received = received
        return experts(received.hidden, received.local_ids, received.weights)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """Issue the combine; the Handle gives [T, hidden] in this rank's token order."""
        assert self._received is not None
        received, self._received = self._received, None
        return self.dispatcher.combine(received, expert_out, async_op=True)
