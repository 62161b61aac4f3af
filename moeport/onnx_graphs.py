"""What `moeport export-onnx` exports: the whole model and each block kind, each with its example inputs, its
dynamic dimensions, and its check against the eager model on inputs of another shape.

The eager outputs a graph is checked against are computed here, when the graph is made,
by the eager model's own path (the experts' sorted slots, not the export's dense form),
so the check covers the export-only formulation as well as the exporter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.export import Dim

from moeport.model.router import Routing, ffn_slots
from moeport.onnx_export import EXPORT_SHAPE, VERIFY_SHAPE, Graph


def _max_difference(got: Any, want: torch.Tensor) -> float:
    """max |got - want| in float32 (inf where the shapes differ)."""
    got = torch.from_numpy(np.asarray(got)).to(torch.float32)
    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    return float((got - want.to(torch.float32)).abs().max()) if want.numel() else 0.0


def _against(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    """A difference function: onnxruntime's outputs against `module` run eagerly on `inputs` now."""
    with torch.no_grad():
        want = module(*inputs)
    wants = want if isinstance(want, tuple) else (want,)
    return lambda outputs: max(_max_difference(got, w) for got, w in zip(outputs, wants))


def _hidden(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random hidden states of `shape` (unit variance, as after a norm)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def model_graph(model: Any) -> Graph:
    """The whole model's prefill: input_ids [batch, seq] -> logits [batch, seq, vocab]."""
    from moeport.model.export import CausalLMGraph

    vocab = model.config.vocab_size
    example = torch.randint(0, vocab, EXPORT_SHAPE, generator=torch.Generator().manual_seed(1))
    verify = torch.randint(0, vocab, VERIFY_SHAPE, generator=torch.Generator().manual_seed(2))
    return Graph("model", CausalLMGraph(model), (example,), {"input_ids": {0: Dim("batch"), 1: Dim("seq")}},
                 (verify,), _against(model, (verify,)))


def _router_difference(router: torch.nn.Module, hidden: torch.Tensor):
    """onnxruntime's router outputs against the eager router's: the same set of experts per token (in any
    order), and their weights; inf where a token's experts differ."""
    with torch.no_grad():
        routing = router(hidden)
    want_ids, order = routing.ids.sort(dim=-1)
    want_weights = routing.weights.gather(1, order)

    def difference(outputs: list[Any]) -> float:
        ids, weights = (torch.from_numpy(np.asarray(o)) for o in outputs)
        ids, order = ids.sort(dim=-1)
        if not torch.equal(ids, want_ids):
            return float("inf")
        return _max_difference(weights.gather(1, order).numpy(), want_weights)

    return difference


def block_graphs(model: Any) -> list[Graph]:
    """attention, dense_ffn, router, experts and scmoe_layer: the blocks of layer 0, each on its own."""
    from moeport.model.export import AttentionGraph, DenseFFNGraph, ExpertsGraph, RouterGraph, ScMoELayerGraph

    layer, config = model.model.layers[0], model.config
    dtype, hidden = model.lm_head.weight.dtype, config.hidden_size
    (b, t), (vb, vt) = EXPORT_SHAPE, VERIFY_SHAPE
    sequence = {"hidden_states": {0: Dim("batch"), 1: Dim("seq")}}
    tokens = Dim("tokens")
    x, vx = _hidden((b, t, hidden), dtype, 3), _hidden((vb, vt, hidden), dtype, 4)
    rows, vrows = _hidden((b * t, hidden), dtype, 5), _hidden((vb * vt, hidden), dtype, 6)
    attention = AttentionGraph(layer.self_attn[0], model.rope_inv_freq)
    ffn = DenseFFNGraph(layer.mlps[0])
    router = RouterGraph(layer.mlp.router)
    experts = ExpertsGraph(layer.mlp.experts)
    with torch.no_grad():
        routing, vrouting = layer.mlp.router(rows), layer.mlp.router(vrows)
    slots, vslots = (rows, routing.ids, routing.weights), (vrows, vrouting.ids, vrouting.weights)

    def eager_experts(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return layer.mlp.experts(h, ffn_slots(Routing(ids, weights), config.n_routed_experts), weights)

    scmoe = ScMoELayerGraph(layer, model.rope_inv_freq)
    return [
        Graph("attention", attention, (x,), sequence, (vx,), _against(attention, (vx,))),
        Graph("dense_ffn", ffn, (x,), sequence, (vx,), _against(ffn, (vx,))),
        Graph("router", router, (rows,), {"hidden_states": {0: tokens}}, (vrows,),
              _router_difference(layer.mlp.router, vrows)),
        Graph("experts", experts, slots, {name: {0: tokens} for name in ExpertsGraph.INPUTS}, vslots,
              _against(_Call(eager_experts), vslots)),
        Graph("scmoe_layer", scmoe, (x,), sequence, (vx,), _against(scmoe, (vx,))),
    ]


class _Call(torch.nn.Module):
    """A function as a module (so `_against` can run it)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)

