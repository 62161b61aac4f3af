"""What a torch.distributed library lacks, judged by what it is and does, not by the name it is registered under.

A vendor's device registers its collective library under a name of its own (hccl, cncl,
...), often over a process group that behaves like one torch ships. So the gaps of a
group (keys of `FALLBACKS`, served by the Communicator's declared fallbacks) are found,
in this order:

1. declared by the device's Backend (`collective_gaps`): the vendor's word wins;
2. from the class of the backend object underneath the group's name (gloo's process
   group lacks an async reduce_scatter, whatever it is called);
3. for a class moeport does not know, from a probe every member of the group runs when
   it is made: does an async reduce_scatter report completion before it is waited for?
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch
import torch.distributed as dist

#: Gaps of the process-group classes torch ships, by class name. gloo's reduce_scatter Work never
#: reports completion until waited for (it is a composite finished inside wait()), so async use
#: cannot overlap it; all_reduce + slice can.
KNOWN_GAPS: dict[str, frozenset[str]] = {
    "ProcessGroupGloo": frozenset({"reduce_scatter"}),
    "ProcessGroupNCCL": frozenset(),
}
#: How long the probe lets an async reduce_scatter take to report completion by itself.
PROBE_S = 0.25

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def backend_classes(group: Any) -> set[str]:
    """The class names of the backend objects under `group`, one per device type it serves (empty where
    this torch cannot tell)."""
    try:
        return {type(group._get_backend(torch.device(kind))).__name__ for kind in group._device_types}
    except (AttributeError, RuntimeError, TypeError):
        return set()


def recognise(group: Any, timeout_s: float) -> frozenset[str]:
    """The gaps of `group`'s library: from the classes underneath it where moeport knows them all, else
    from `probe` (a collective: every member of the group must call this)."""
    classes = backend_classes(group)
    if classes and classes <= set(KNOWN_GAPS):
        return frozenset().union(*(KNOWN_GAPS[name] for name in classes))
    return probe(group, timeout_s)


def probe(group: Any, timeout_s: float) -> frozenset[str]:
    """Ask the library: an async reduce_scatter that has not reported completion within PROBE_S is a gap
    (waited for at the end either way, so the ranks stay in step); the members agree on the answer."""
    kinds = [device.type for device in getattr(group, "_device_types", [])] or ["cpu"]
    device = torch.device(kinds[0] if len(kinds) == 1 or "cpu" not in kinds else "cpu")
    size = dist.get_world_size(group)
    work = _reduce_scatter_single(torch.zeros(1, device=device), torch.ones(size, device=device), group=group,
                                  async_op=True)
    deadline = time.monotonic() + PROBE_S
    while not work.is_completed() and time.monotonic() < deadline:
        time.sleep(0.002)
    lacks = torch.tensor([0 if work.is_completed() else 1], device=device)
    work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    dist.all_reduce(lacks, op=dist.ReduceOp.MAX, group=group)
    return frozenset({"reduce_scatter"}) if int(lacks.item()) else frozenset()
