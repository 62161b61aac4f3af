"""The model and its blocks as graphs of static shape, for exporters (ONNX) and the vendor compilers behind them.

The eager model sorts each FFN expert's slots and runs only the experts that have some:
shapes that depend on the routing, which a graph of fixed operators cannot express. For
export the FFN experts are written the way a graph can hold them, mathematically the same:
every expert runs on every row, batched over the experts ([E, N, H] @ [E, H, 2I], then
[E, N, I] @ [E, I, H]), and each row sums its experts' outputs weighted by a dense [N, E]
gate matrix that holds the router's weights at the chosen experts and zero elsewhere.
That costs E / k times the experts' FLOPs of the eager path (every expert on every token
instead of the k chosen ones) for a graph with no data-dependent shape. Attention,
the dense FFNs, the router and the zero-computation experts are the eager model's own
modules, with the rotation computed in the graph for any sequence length.

Each wrapper's forward names what it takes and gives (INPUTS / OUTPUTS): the contract a
vendor compiler sees.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moeport.collectives.base import CompletedHandle, Handle
from moeport.model.experts import ExpertFFNs
from moeport.model.layer import ScMoELayer
from moeport.model.lm import LongcatForCausalLM
from moeport.model.mla import MLA, rope_cos_sin
from moeport.model.router import Router, Routing


def experts_all_dense(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """The FFN experts' weighted output for rows x [N, H], with every expert on every row: the same sum as
    ExpertFFNs over the slots whose id is an FFN expert (ids [N, k] in [0, E); other ids add nothing)."""
    experts = gate_up.shape[0]
    valid = ids < experts
    gates = torch.zeros(x.shape[0], experts + 1, dtype=torch.float32, device=x.device)  # [N, E] + one column dropped
    gates = gates.scatter_add(1, torch.where(valid, ids, experts), torch.where(valid, weights, 0.0).to(torch.float32))
    gate, up = torch.matmul(x.unsqueeze(0), gate_up).chunk(2, dim=-1)  # [E, N, I] each
    outputs = torch.matmul(F.silu(gate) * up, down)  # [E, N, H]
    mixed = torch.matmul(gates[:, None, :experts].to(x.dtype), outputs.transpose(0, 1))  # [N, 1, E] @ [N, E, H]
    return mixed.squeeze(1)


class DenseExpertExchange:
    """The expert exchange of one process holding every FFN expert, its compute `experts_all_dense`."""

    def prepare(self, tokens: torch.Tensor, routing: Routing, decoding: bool = False) -> tuple:
        """The rows and their routing, as they are."""
        return tokens, routing.ids, routing.weights

    def dispatch(self, prepared: tuple) -> Handle:
        """Nothing travels."""
        return CompletedHandle(prepared)

    def compute(self, experts: ExpertFFNs, received: tuple) -> torch.Tensor:
        """Every expert on every row, weighted by the router's choice."""
        tokens, ids, weights = received
        return experts_all_dense(tokens, ids, weights, experts.gate_up, experts.down)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """Nothing travels."""
        return CompletedHandle(expert_out)


@contextlib.contextmanager
def dense_experts(model: LongcatForCausalLM) -> Iterator[LongcatForCausalLM]:
    """Within the block, every layer of `model` (one process, every expert local) runs its FFN experts as
    `experts_all_dense`; the eager exchanges come back after it."""
    if model.context.ep.world_size > 1:
        raise ValueError("export needs every FFN expert in one process (a model built without an expert-parallel "
                         "group)")
    kept = [layer.exchange for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.exchange = DenseExpertExchange()
        yield model
    finally:
        for layer, exchange in zip(model.model.layers, kept):
            layer.exchange = exchange


def rotation(inv_freq: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of positions 0 .. length - 1 ([1, 1, length, rope]), computed in the graph."""
    return rope_cos_sin(inv_freq, torch.arange(length, device=inv_freq.device).unsqueeze(0), dtype)


class CausalLMGraph(nn.Module):
    """The whole model's prefill: input_ids [batch, seq] -> logits [batch, seq, vocab] (use under dense_experts)."""

    INPUTS, OUTPUTS = ("input_ids",), ("logits",)

    def __init__(self, model: LongcatForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.model.embed_tokens(input_ids)
        cos, sin = rotation(m.rope_inv_freq, input_ids.shape[1], x.dtype)
        for layer in m.model.layers:
            x = layer(x, cos, sin, schedule="sequential")
        return m.lm_head(m.model.norm(x))


class _RotatedGraph(nn.Module):
    """A block that takes the rotation of its sequence's positions, computed in the graph from `inv_freq`."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def rotation_of(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0 .. seq - 1 of hidden_states [batch, seq, hidden]."""
        return rotation(self.inv_freq, hidden_states.shape[1], hidden_states.dtype)


class AttentionGraph(_RotatedGraph):
    """One MLA sublayer (no cache; causal): hidden_states [batch, seq, hidden] (its normed input) ->
    attn_output [batch, seq, hidden]."""

    INPUTS, OUTPUTS = ("hidden_states",), ("attn_output",)

    def __init__(self, attention: MLA, inv_freq: torch.Tensor) -> None:
        super().__init__(inv_freq)
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attention(hidden_states, *self.rotation_of(hidden_states))


class DenseFFNGraph(nn.Module):
    """One dense SwiGLU FFN: hidden_states [batch, seq, hidden] -> ffn_output [batch, seq, hidden]."""

    INPUTS, OUTPUTS = ("hidden_states",), ("ffn_output",)

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn(hidden_states)


class RouterGraph(nn.Module):
    """The router: hidden_states [tokens, hidden] -> expert_ids [tokens, k] (int64; ids >= the number of FFN
    experts are zero-computation experts) and expert_weights [tokens, k] (float32, times routed_scaling_factor)."""

    INPUTS, OUTPUTS = ("hidden_states",), ("expert_ids", "expert_weights")

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.router(hidden_states)
        return routing.ids, routing.weights


class ExpertsGraph(nn.Module):
    """The FFN experts batched over experts: hidden_states [tokens, hidden], expert_ids [tokens, k], expert_weights
    [tokens, k] -> experts_output [tokens, hidden], the weighted sum of each token's FFN experts (zero-expert
    slots add nothing here: the layer adds their share)."""

    INPUTS, OUTPUTS = ("hidden_states", "expert_ids", "expert_weights"), ("experts_output",)

    def __init__(self, experts: ExpertFFNs) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return experts_all_dense(hidden_states, expert_ids, expert_weights, self.experts.gate_up, self.experts.down)


class ScMoELayerGraph(_RotatedGraph):
    """One whole ScMoE layer (use under dense_experts): hidden_states [batch, seq, hidden] -> layer_output
    [batch, seq, hidden]."""

    INPUTS, OUTPUTS = ("hidden_states",), ("layer_output",)

    def __init__(self, layer: ScMoELayer, inv_freq: torch.Tensor) -> None:
        super().__init__(inv_freq)
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states, *self.rotation_of(hidden_states), schedule="sequential")
