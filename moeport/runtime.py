"""The Runtime: what the model sees of the machine.

One per process: the Backend (device, streams, events), the world Communicator
and the expert-/data-/tensor-parallel groups. The model receives only this
object and never names a device or a collective library itself.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import torch

from moeport.backends.base import Backend
from moeport.backends.registry import Selection, select
from moeport.base.dtypes import torch_dtype
from moeport.base.errors import UserError
from moeport.collectives.base import FALLBACKS, Communicator
from moeport.collectives.local import LocalCommunicator
from moeport.launch import RankEnv, detect_rank_env
from moeport.model.context import ModelContext
from moeport.profile import Profile


@dataclasses.dataclass
class ParallelGroups:
    """The communicators a rank belongs to.

    ep: the ranks that share one copy of the experts (experts split over them);
    dp: the ranks that hold the same experts (one per ep group); tp: reserved, size 1.
    """

    world: Communicator
    ep: Communicator
    dp: Communicator
    tp: Communicator


def parallel_layout(world_size: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ep groups, dp groups) as lists of world ranks: ep groups are blocks of consecutive ranks."""
    ep_groups = [list(range(start, start + ep)) for start in range(0, world_size, ep)]
    dp_groups = [list(range(offset, world_size, ep)) for offset in range(ep)]
    return ep_groups, dp_groups


def _check_world_size(profile: Profile, rank_env: RankEnv, requested: int | None) -> Profile:
    """Reconcile the profile's world size with the launcher's."""
    if rank_env.launcher in ("torchrun", "mpiexec"):
        if requested is not None and requested != rank_env.world_size:
            raise UserError(
                f"--world-size {requested} disagrees with {rank_env.launcher}, which started {rank_env.world_size} ranks"
            )
        return profile.with_world_size(rank_env.world_size)
    if rank_env.launcher == "spawn" and rank_env.world_size != profile.world_size:
        raise AssertionError("spawned ranks must be given the profile's world size")
    if rank_env.launcher == "single" and profile.world_size != 1:
        raise AssertionError("a single process needs world size 1; use moeport.launch to start more ranks")
    return profile


def _init_torch_distributed(profile: Profile, backend: Backend, rank_env: RankEnv) -> Communicator:
    import torch.distributed as dist

    from moeport.collectives.torch_dist import TorchDistCommunicator, timeouts_named

    name = profile.collectives.backend or backend.default_collectives
    gaps = _declared_gaps(backend)
    is_available = getattr(dist, "is_backend_available", None)
    if is_available is not None and not is_available(name):
        raise UserError(
            f"{profile.source}: collectives.backend: torch.distributed backend {name!r} is not available in this "
            f"torch build (torch {torch.__version__})"
        )
    timeout = datetime.timedelta(seconds=profile.collectives.timeout_s)
    kwargs: dict[str, Any] = {"backend": name, "rank": rank_env.rank, "world_size": rank_env.world_size, "timeout": timeout}
    if rank_env.launcher == "spawn":
        kwargs["store"] = dist.TCPStore(
            rank_env.master_addr, rank_env.master_port, is_master=False, timeout=timeout
        )
    elif rank_env.launcher == "single":
        kwargs["store"] = dist.HashStore()
    elif rank_env.launcher == "torchrun":
        kwargs["init_method"] = "env://"
    elif rank_env.master_addr is not None and rank_env.master_port is not None:
        kwargs["init_method"] = f"tcp://{rank_env.master_addr}:{rank_env.master_port}"
    else:
        kwargs["store"] = _store_over_mpi(rank_env, timeout)
    if backend.device_type != "cpu" and "device_id" in dist.init_process_group.__code__.co_varnames:
        kwargs["device_id"] = backend.device()
    with timeouts_named(f"joining the {name} process group", profile.collectives.timeout_s):
        dist.init_process_group(**kwargs)
    return TorchDistCommunicator(timeout_s=profile.collectives.timeout_s, force_fallbacks=profile.collectives.fallbacks,
                                 gaps=gaps)


def _declared_gaps(backend: Backend) -> frozenset[str] | None:
    """The gaps the backend declares for its collective library (None: recognised from the group); an
    unknown name is the plugin's mistake, named with its class."""
    gaps = type(backend).collective_gaps
    if gaps is None:
        return None
    unknown = sorted(set(gaps) - set(FALLBACKS))
    if unknown:
        owner = f"{type(backend).__module__}:{type(backend).__qualname__}"
        raise UserError(f"backend {owner}: collective_gaps: unknown {unknown[0]!r}; expected some of "
                        f"{', '.join(FALLBACKS)}")
    return frozenset(gaps)


def _store_over_mpi(rank_env: RankEnv, timeout: datetime.timedelta) -> Any:
    """A rendezvous store for ranks that mpiexec started without MASTER_ADDR: rank 0 hosts it."""
    import socket

    import torch.distributed as dist

    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(
            "started by mpiexec without MASTER_ADDR / MASTER_PORT: set both, or install the mpi extra "
            "(pip install 'moeport[mpi]') so rank 0 can share its address"
        ) from None
    store = None
    if rank_env.rank == 0:
        store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=timeout)
        address = (socket.gethostname(), store.port)
    else:
        address = None
    host, port = MPI.COMM_WORLD.bcast(address, root=0)
    if store is None:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    return store


def select_backend(profile: Profile) -> Selection:
    """The profile's backend, with errors prefixed by the profile file and key."""
    try:
        return select(profile.backend, profile.device_type, profile.collectives.backend)
    except UserError as exc:
        raise UserError(f"{profile.source}: backend: {exc}") from None


class Runtime:
    """The device, the communicators and the parallel layout of one rank.

    Start one with `Runtime.start(profile)` in each rank (spawned, torchrun or
    mpiexec); `close()` (or leaving a `with` block) tears the collectives down.
    """

    def __init__(
        self, profile: Profile, selection: Selection, groups: ParallelGroups, rank_env: RankEnv
    ) -> None:
        self.profile = profile
        self.selection = selection
        self.backend = selection.backend
        self.groups = groups
        self.comm = groups.world
        self.rank_env = rank_env
        self.device = self.backend.device()
        self.dtype = torch_dtype(profile.dtype)

    @property
    def rank(self) -> int:
        """This process's rank in the world group."""
        return self.comm.rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the job."""
        return self.comm.world_size

    @classmethod
    def start(
        cls, profile: Profile, requested_world_size: int | None = None, rank_env: RankEnv | None = None
    ) -> "Runtime":
        """Bring up this rank: choose the backend, bind the device, join the collectives, build the groups."""
        rank_env = rank_env or detect_rank_env()
        profile = _check_world_size(profile, rank_env, requested_world_size)
        selection = select_backend(profile)
        backend = selection.backend
        if profile.dtype not in backend.capabilities.dtypes:
            raise UserError(
                f"{profile.source}: dtype: {profile.dtype} is not supported by backend {backend.name!r} "
                f"(supports {', '.join(backend.capabilities.dtypes)})"
            )
        backend.set_device(rank_env.local_rank)
        backend.manual_seed(profile.seed)
        if profile.collectives.library == "mpi":
            from moeport.collectives.mpi import MPICommunicator

            world: Communicator = MPICommunicator.world(
                timeout_s=profile.collectives.timeout_s, force_fallbacks=profile.collectives.fallbacks
            )
        else:
            world = _init_torch_distributed(profile, backend, rank_env)
        try:
            groups = cls._build_groups(world, profile.ep)
        except BaseException:
            world.close()
            raise
        if profile.emulated_link is not None:
            from moeport.collectives.emulated_link import EmulatedLink

            link = profile.emulated_link
            groups = ParallelGroups(
                **{
                    f.name: EmulatedLink(getattr(groups, f.name), link.latency_us, link.bandwidth_gbps)
                    for f in dataclasses.fields(groups)
                }
            )
        return cls(profile, selection, groups, rank_env)

    @staticmethod
    def _build_groups(world: Communicator, ep: int) -> ParallelGroups:
        ep_groups, dp_groups = parallel_layout(world.world_size, ep)
        mine = [g for g in ep_groups if world.rank in g][0]
        ep_comm = world if len(mine) == world.world_size else world.new_group(mine)
        mine_dp = [g for g in dp_groups if world.rank in g][0]
        if len(mine_dp) == 1:
            dp_comm: Communicator = LocalCommunicator(world.rank)
        elif len(mine_dp) == world.world_size:
            dp_comm = world
        else:
            dp_comm = world.new_group(mine_dp)
        assert ep_comm is not None and dp_comm is not None
        return ParallelGroups(world=world, ep=ep_comm, dp=dp_comm, tp=LocalCommunicator(world.rank))

    def model_context(self) -> ModelContext:
        """What a model built on this rank sees: the ep group, the schedule, the device, the dtype, the
        kernels the backend offers the experts, and how the MoE's tokens travel."""
        return ModelContext(self.groups.ep, self.profile.schedule, self.device, self.dtype,
                            self.backend.offered_expert_kernels, self.profile.moe.dispatch,
                            self.profile.moe.max_tokens_per_rank)

    def close(self, clean: bool = True) -> None:
        """Leave the collectives; the Runtime is unusable afterwards.

        A clean close first waits for every rank, so no rank tears its
        connections down while a peer still uses them. After a failure it does
        nothing: the rank is about to report its error and exit, and connections
        torn down first would make its peers fail with "connection reset" before
        the real cause reaches the launcher.
        """
        if not clean:
            return
        if self.world_size > 1:
            self.comm.barrier()
        for comm in (self.groups.ep, self.groups.dp, self.groups.tp):
            if comm is not self.groups.world:
                comm.close()
        self.groups.world.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.close(clean=exc_type is None)
