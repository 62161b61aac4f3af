"""The backward pass keeps the forward's schedule: the experts' gradients travel while the dense path's backward runs.

One spawn of two ranks behind a slow emulated link serves every check: gradients under both schedules, where each
backward exchange was issued and waited for against the dense FFNs' backward, and the replicated gradients' buckets
issued while the backward still ran.
"""

from __future__ import annotations

import pytest
import torch

from moeport.jobs import my_rows
from moeport.model import PRESETS, LongcatForCausalLM
from moeport.model.init import init_weights
from moeport.model.timeline import Timeline
from moeport.model.training import Trainer, TrainSettings
from moeport.profile import load_profile
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)

#: Each backward exchange's window: the dense FFN whose backward runs between its issue and its wait under overlap
#: (the forward's window reversed: FFN1 in the combine's, FFN0 in the dispatch's).
WINDOW = {"combine_backward": 1, "dispatch_backward": 0}


class BackwardWitness(Timeline):
    """A Timeline that also keeps each backward exchange, to read its issue and wait events after the backward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges = []

    def add_backward(self, name, exchange) -> None:
        super().add_backward(name, exchange)
        self.exchanges.append((self.layer, name, exchange))


def backward_job(rt, repeats):
    """Per schedule and repeat: this rank's gradients, each backward exchange's events against the dense FFNs'
    backward (begin, end), in ms from the timeline's origin, and how many gradient buckets went out during the
    backward (of how many)."""
    model = init_weights(LongcatForCausalLM(PRESETS["tiny"], rt), 0)
    trainer = Trainer(model, TrainSettings(ffn_experts_per_token=2.5, balance_coef=0.05, z_loss_coef=1e-4))
    ids = torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(3))[my_rows(8, rt.rank, 2)]
    ffn_marks = {}

    def hooks(layer_index, ffn_index, module):
        def mark(edge):
            def hook(*_):
                ffn_marks.setdefault((layer_index, ffn_index, edge), model.timeline.mark())
            return hook
        module.register_full_backward_pre_hook(mark("begin"))
        module.register_full_backward_hook(mark("end"))

    for index, layer in enumerate(model.model.layers):
        for f, mlp in enumerate(layer.mlps):
            hooks(index, f, mlp)
    out = {"sequential": [], "overlap": []}
    for i in range(repeats):
        for schedule in ("sequential", "overlap") if i % 2 == 0 else ("overlap", "sequential"):
            model.schedule = schedule
            timeline = model.timeline = BackwardWitness.for_backend(rt.backend)
            ffn_marks.clear()
            model.zero_grad(set_to_none=True)
            rt.comm.barrier()
            lm, balance, z, _ = trainer.losses(ids)
            trainer.grad_sync.arm()
            (lm + balance + z).backward()
            during = trainer.grad_sync.issued
            trainer._sync_gradients()
            origin = timeline.mark()

            def ms(event):
                return -event.elapsed_time(origin)
            windows = []
            for layer, name, exchange in timeline.exchanges:
                events = exchange.span()
                ffn = [ms(ffn_marks[(layer, WINDOW[name], edge)]) for edge in ("begin", "end")]
                windows.append({"name": name, "layer": layer, "issue_returned": ms(events["issue_returned"]),
                                "wait_began": ms(events["wait_began"]), "in_flight": not events["complete_before_wait"],
                                "ffn": ffn})
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out[schedule].append({"grads": grads, "windows": windows, "buckets": (during, len(trainer.grad_sync.buckets)),
                                  "spans": [s.name for s in timeline.spans() if s.track == "comm"]})
            model.timeline = None
    trainer.close()
    return out


def test_backward_exchanges_overlap_the_dense_backward_and_gradients_do_not_change():
    """Under overlap each backward exchange is issued before the backward of the dense FFN of its window and waited
    for after it, mostly still in flight when its wait began; under sequential that FFN's backward runs wholly before
    the issue or after the wait. Every rank's gradients are bit-identical under both schedules. The replicated
    gradients' buckets (one per layer, one each for lm_head, the final norm and the embedding) all go out during
    the backward, each as its last gradient arrives; every step records the four MoE communications per layer, backward ones included."""
    profile = load_profile("emulated-link").replace(emulated_link={"latency_us": 1500.0, "bandwidth_gbps": 1.0})
    results = run_ranks(backward_job, 2, profile, args=(2,), timeout_s=240)
    in_flight = []
    for r in results:
        for seq, ovl in zip(r["sequential"], r["overlap"]):
            assert seq["grads"].keys() == ovl["grads"].keys()
            for name in seq["grads"]:
                assert torch.equal(seq["grads"][name], ovl["grads"][name]), name
        for step in r["overlap"]:
            assert len(step["windows"]) == 4
            for w in step["windows"]:
                begin, end = w["ffn"]
                assert w["issue_returned"] <= begin and end <= w["wait_began"], w
                in_flight.append(w["in_flight"])
        for step in r["sequential"]:
            for w in step["windows"]:
                begin, end = w["ffn"]
                assert end <= w["issue_returned"] or begin >= w["wait_began"], w
        for step in r["sequential"] + r["overlap"]:
            during, buckets = step["buckets"]
            assert during == buckets == 5, step["buckets"]  # every gradient arrives within the backward
            assert sorted(step["spans"]) == sorted(["dispatch", "combine", "dispatch_backward", "combine_backward"] * 2)
    assert sum(in_flight) >= len(in_flight) / 2, in_flight
