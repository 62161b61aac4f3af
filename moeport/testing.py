"""Running test functions on several ranks: for our tests and for vendors testing their plugins.

    from moeport.testing import run_ranks

    def check_sum(rt):
        t = torch.ones(3) * (rt.rank + 1)
        rt.comm.all_reduce(t)
        return t.tolist()

    results = run_ranks(check_sum, world_size=2, profile="mychip.yaml")

The function must be importable (defined at module level); it receives the
rank's Runtime and returns a picklable value.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from moeport.jobs import start_ranks
from moeport.launch import RankFailure
from moeport.profile import Profile, load_profile


class RankError(AssertionError):
    """A rank of a multi-rank test failed; the message names the rank and carries its traceback."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    profile: str | Profile = "cpu-gloo",
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    **changes: Any,
) -> list[Any]:
    """Run `fn(runtime, *args)` on `world_size` spawned ranks and return each rank's result, in rank order.

    Ranks are spawned locally, or started by mpiexec when the profile's collectives library is mpi.

    `profile` is a shipped name, a path or a Profile; `changes` override its keys
    (dotted paths as keyword names are not possible, so use `Profile.replace` for
    nested keys). A failing rank raises RankError naming the rank with its
    traceback; past `timeout_s` every rank is stopped and RankError names those
    still running.
    """
    loaded = load_profile(profile) if isinstance(profile, str) else profile
    if changes:
        loaded = loaded.replace(**changes)
    loaded = loaded.with_world_size(world_size)
    try:
        return start_ranks(fn, args, loaded, timeout_s)
    except RankFailure as failure:
        detail = f"\n{failure.details}" if failure.details else ""
        raise RankError(f"{failure}{detail}") from None
