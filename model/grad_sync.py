"""Replicated weights' gradients summed over the ranks while the backward still runs.

The gradients are cut into buckets in the order the backward produces them (the reverse of
the parameters' order: lm_head first, the embedding last), a bucket closing at the end of
each decoder layer's weights and at a size cap. A bucket's all_reduce is issued, without
waiting, as soon as the backward has accumulated every gradient in it and every earlier
bucket has been issued: the issue order is the same on every rank whatever order the
gradients arrive in, as the collective libraries require. `finish` issues what the backward
left (parameters that got no gradient count as zeros), waits for every bucket and writes the
sums back.

The buckets travel on a communicator of their own (a group of the same ranks), so that
their all_reduces never queue behind or interleave with the experts' exchanges of the same
backward on the model's group, whose order autograd decides.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moeport.collectives.base import Communicator, Handle

#: Most elements in one gradient bucket (float32: 16 MiB); a decoder layer's weights start a new bucket too.
BUCKET_ELEMENTS = 4 << 20


def bucket_key(name: str) -> str:
    """What a parameter shares a bucket with: its decoder layer (model.layers.N), else its top-level module."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2:
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if parts[0] == "model" else parts[0]


class GradientBuckets:
    """Sums the gradients of `named` parameters (name, parameter) over the ranks of `comm`, one bucket at a time
    as the backward produces them. Call `arm()` before a backward, `finish()` after it, on every rank.

    With `mark` (a function recording a timing event), `blocked` lists after `finish` the (start, end) event
    pairs during which the caller was held up: each issue, and each wait.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], comm: Communicator,
                 bucket_elements: int = BUCKET_ELEMENTS) -> None:
        self.comm = comm
        self.buckets: list[list[torch.nn.Parameter]] = []
        key, size = None, 0
        for name, p in reversed(named):
            if not self.buckets or bucket_key(name) != key or size + p.numel() > bucket_elements:
                self.buckets.append([])
                key, size = bucket_key(name), 0
            self.buckets[-1].append(p)
            size += p.numel()
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._armed = False
        self._missing: list[int] = []
        self._issued: list[tuple[torch.Tensor, Handle]] = []
        self.mark: Callable[[], Any] | None = None
        self.blocked: list[tuple[Any, Any]] = []
        for bucket in self.buckets:
            for p in bucket:
                p.register_post_accumulate_grad_hook(self._accumulated)

    def arm(self) -> None:
        """Start watching a backward: every bucket waits for its gradients again."""
        self._armed = True
        self._missing = [len(bucket) for bucket in self.buckets]
        self._issued = []
        self.blocked = []

    @property
    def issued(self) -> int:
        """How many buckets of this backward have been issued so far."""
        return len(self._issued)

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        self._missing[self._bucket_of[id(p)]] -= 1
        while len(self._issued) < len(self.buckets) and self._missing[len(self._issued)] == 0:
            self._issue(len(self._issued))

    def _issue(self, index: int) -> None:
        start = self._mark()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[index]])
        self._issued.append((flat, self.comm.all_reduce(flat, async_op=True)))
        self._note(start)

    def finish(self) -> None:
        """Issue the buckets the backward did not complete, wait for all of them and write the sums into the
        parameters' gradients."""
        while len(self._issued) < len(self.buckets):
            self._issue(len(self._issued))
        self._armed = False
        for bucket, (flat, handle) in zip(self.buckets, self._issued):
            start = self._mark()
            handle.wait(self.comm.timeout_s)
            self._note(start)
            offset = 0
            for p in bucket:
                summed = flat[offset: offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += p.numel()
        self._issued = []

    def _mark(self) -> Any:
        return self.mark() if self.mark is not None else None

    def _note(self, start: Any) -> None:
        if self.mark is not None:
            self.blocked.append((start, self.mark()))
