"""A chip vendor's plugin whose device registers its own torch.distributed library (for the tests).

`testccl` is gloo's process group under another name, as a vendor's library built on a
process group that behaves like gloo's would be: moeport must recognise its gaps by what
it is, not by its name. `TestCCLBackend` leaves the gaps to moeport; `DeclaredGapsBackend`
declares them itself (the declaration wins, so its uneven all_to_all runs on the padded
fallback too); `NoGapsBackend` declares, wrongly, that it lacks nothing; `WrongGapBackend`
declares a gap moeport has no fallback for.
"""

import torch.distributed as dist

from moeport.backends.generic import GenericBackend


def _gloo_under_another_name(store, rank, world_size, timeout):
    """The library's process group: gloo's."""
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


if "testccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("testccl", _gloo_under_another_name, devices=["cpu"])


class TestCCLBackend(GenericBackend):
    """The CPU, with collectives through the vendor's `testccl`."""

    name = "testccl-chip"
    device_type = "cpu"
    default_collectives = "testccl"


class DeclaredGapsBackend(TestCCLBackend):
    """The same, with the library's gaps declared by the vendor."""

    collective_gaps = frozenset({"reduce_scatter", "uneven_all_to_all"})


class NoGapsBackend(TestCCLBackend):
    """A declaration that the library lacks nothing, which its async reduce_scatter belies."""

    collective_gaps = frozenset()


class WrongGapBackend(TestCCLBackend):
    """A declaration naming no fallback moeport has."""

    collective_gaps = frozenset({"all_to_all_v"})
