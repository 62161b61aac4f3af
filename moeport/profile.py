"""Profiles: YAML files that pick the backend, the collectives, the parallel layout and the model.

`load_profile("cpu-gloo")` finds a shipped profile by name; `load_profile("x.yaml")` reads a
file. Validation is strict: an unknown key, a wrong type or an impossible value is a
UserError naming the file, the key path and what was expected.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from moeport.base.dtypes import MODEL_DTYPES
from moeport.base.errors import UserError, format_validation_error
from moeport.collectives.base import FALLBACKS
from moeport.model.config import PRESETS, LongcatConfig, preset
from moeport.model.exchange import DISPATCH_MODES
from moeport.model.schedule import SCHEDULES
from moeport.plan.hardware import HardwareSpec, shipped_data
from moeport.plan.workload import PlanSection
from moeport.train_profile import TrainSection
from moeport.yaml_file import read_yaml

DEFAULT_PROFILE = "cpu-gloo"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CollectivesSection(_Section):
    """Which collective library carries the ranks' traffic."""

    library: Literal["torch", "mpi"] = "torch"
    backend: str | None = Field(default=None, min_length=1)  # torch.distributed backend name
    timeout_s: float = Field(default=60.0, gt=0)
    # Force the documented fallbacks even where the library has the native op (testing, debugging).
    fallbacks: list[Literal[tuple(FALLBACKS)]] = []  # type: ignore[valid-type]


class ParallelSection(_Section):
    """How many ranks, and how they split into expert- and data-parallel groups."""

    world_size: int = Field(default=1, ge=1)
    ep: int | None = Field(default=None, ge=1)
    tp: Literal[1] = 1  # reserved: tensor parallelism is not implemented


class ModelSection(_Section):
    """The model to build: a named preset or an HF checkpoint directory (exactly one)."""

    preset: Literal[tuple(PRESETS)] | None = None  # type: ignore[valid-type]
    checkpoint: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if self.preset is not None and self.checkpoint is not None:
            raise ValueError("give either preset or checkpoint, not both")
        return self


class MoESection(_Section):
    """How the MoE's tokens travel between expert-parallel ranks (model/exchange.py).

    dispatch: auto (decoding steps low-latency, prefill normal), normal (the row counts
    first, then exactly the rows needed) or low_latency (fixed room of
    max_tokens_per_rank rows per rank, one exchange each way, no counts).
    """

    dispatch: Literal[DISPATCH_MODES] = "auto"  # type: ignore[valid-type]
    max_tokens_per_rank: int = Field(default=128, ge=1)


class EmulatedLinkSection(_Section):
    """An emulated interconnect: each collective completes no sooner than latency + bytes / bandwidth."""

    latency_us: float = Field(ge=0)
    bandwidth_gbps: float = Field(gt=0)


class Profile(_Section):
    """A validated profile. `source` says which file it came from."""

    backend: str = Field(default="cpu", min_length=1)
    device_type: str | None = Field(default=None, min_length=1)  # for the generic backend
    collectives: CollectivesSection = CollectivesSection()
    parallel: ParallelSection = ParallelSection()
    dtype: Literal[tuple(MODEL_DTYPES)] = "float32"  # type: ignore[valid-type]
    schedule: Literal[SCHEDULES] = "overlap"  # type: ignore[valid-type]
    seed: int = Field(default=0, ge=0)
    model: ModelSection = ModelSection()
    moe: MoESection = MoESection()
    emulated_link: EmulatedLinkSection | None = None
    # `moeport plan`'s sections: the hardware (a mapping, or a shipped hardware's name) and the workload
    hardware: HardwareSpec | None = None
    plan: PlanSection = PlanSection()
    train: TrainSection = TrainSection()  # `moeport train`'s settings

    _source: str = PrivateAttr(default="<profile>")

    @field_validator("hardware", mode="before")
    @classmethod
    def _shipped_hardware(cls, value: Any) -> Any:
        """A shipped hardware's name stands for its mapping."""
        return shipped_data(value) if isinstance(value, str) else value

    @property
    def source(self) -> str:
        """The file this profile was read from."""
        return self._source

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.parallel.world_size

    @property
    def ep(self) -> int:
        """Expert-parallel group size: `parallel.ep`, else the whole world."""
        return self.parallel.ep or self.parallel.world_size

    @property
    def dp(self) -> int:
        """Data-parallel degree: world_size / ep."""
        return self.world_size // self.ep

    def replace(self, **changes: Any) -> "Profile":
        """A copy with top-level or dotted-path keys changed, validated again, keeping the source."""
        data = self.model_dump()
        for key, value in changes.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return parse_profile(data, self._source)

    def with_world_size(self, world_size: int | None) -> "Profile":
        """This profile with `--world-size` applied (None keeps it)."""
        if world_size is None or world_size == self.world_size:
            return self._check_ep("parallel.world_size")
        if world_size < 1:
            raise UserError(f"--world-size: expected a positive integer, got {world_size}")
        return self.replace(**{"parallel.world_size": world_size})._check_ep("--world-size")

    def _check_ep(self, where: str) -> "Profile":
        ep, world = self.parallel.ep, self.parallel.world_size
        if ep is not None and world % ep:
            raise UserError(f"{self.source}: parallel.ep: ep = {ep} does not divide world_size = {world} ({where})")
        return self

    def check_dispatch_room(self, decode_tokens: int, prefill_tokens: int, what: str) -> None:
        """Reject a run whose tokens per rank do not fit the low-latency dispatch's room (moe.max_tokens_per_rank):
        a decoding step's under dispatch auto or low_latency, a prefill's under low_latency. `what` names the run's
        sizes for the message. Nothing to check when one rank holds every expert."""
        room, mode = self.moe.max_tokens_per_rank, self.moe.dispatch
        steps = [("a decoding step", decode_tokens)] if mode in ("auto", "low_latency") else []
        steps += [("the prefill", prefill_tokens)] if mode == "low_latency" else []
        for step, tokens in steps:
            if self.ep > 1 and tokens > room:
                raise UserError(
                    f"{self.source}: moe.max_tokens_per_rank: {room} is less than the {tokens} tokens per rank of "
                    f"{step} ({what}); raise it, or set moe.dispatch: normal"
                )

    def check_experts(self, n_routed_experts: int, what: str) -> None:
        """Reject an ep that the model's number of FFN experts cannot be split over."""
        ep = f"ep = {self.ep}" if self.parallel.ep is not None else f"ep = world_size = {self.ep}"
        if self.ep > n_routed_experts:
            raise UserError(
                f"{self.source}: parallel.ep: {ep} is larger than the {n_routed_experts} FFN experts of {what}"
            )
        if n_routed_experts % self.ep:
            raise UserError(
                f"{self.source}: parallel.ep: {ep} does not divide the {n_routed_experts} FFN experts of {what}"
            )

    def model_source(self) -> tuple[str, str]:
        """("preset", name) or ("checkpoint", path); the tiny preset when the profile names neither."""
        if self.model.checkpoint is not None:
            return "checkpoint", self.model.checkpoint
        return "preset", self.model.preset or "tiny"


def model_config_of(profile: Profile) -> tuple[Any, str]:
    """(LongcatConfig, description) of the profile's model, checked against its ep."""
    kind, value = profile.model_source()
    if kind == "preset":
        config, what = preset(value, f"{profile.source}: model.preset"), f"preset {value!r}"
    else:
        if not os.path.isdir(value):
            raise UserError(f"{profile.source}: model.checkpoint: no such directory {value!r}")
        config, what = LongcatConfig.from_file(value), f"checkpoint {value!r}"
    profile.check_experts(config.n_routed_experts, what)
    return config, what


def parse_profile(data: Any, source: str) -> Profile:
    """Validate a profile mapping read from `source`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of profile keys, got {type(data).__name__}")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc.errors()[0])) from None
    profile._source = source
    base = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    checkpoint = profile.model.checkpoint
    if checkpoint is not None and not os.path.isabs(checkpoint):
        profile = profile.replace(model={"checkpoint": os.path.normpath(os.path.join(base, checkpoint))})
    return profile


def shipped_profiles() -> dict[str, str]:
    """Shipped profile name -> file path."""
    folder = importlib.resources.files("moeport.profiles")
    return {
        entry.name[: -len(".yaml")]: str(entry)
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def find_profile(name_or_path: str | None) -> str:
    """The file for `--profile`: a path if one exists there, else a shipped profile's name."""
    spec = name_or_path or DEFAULT_PROFILE
    if os.path.isfile(spec):
        return spec
    shipped = shipped_profiles()
    if spec in shipped:
        return shipped[spec]
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        raise UserError(f"--profile {spec}: no such file")
    raise UserError(f"--profile {spec}: not a file and not a shipped profile; shipped: {', '.join(shipped)}")


def load_profile(name_or_path: str | None = None, world_size: int | None = None) -> Profile:
    """Read and validate a profile by shipped name or path, with an optional world-size override."""
    path = find_profile(name_or_path)
    data = read_yaml(path, "profile")
    return parse_profile(data, path).with_world_size(world_size)
