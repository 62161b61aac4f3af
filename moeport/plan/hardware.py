"""The hardware a plan is made for: peak rates, achieved fractions of them, the link, the price.

A hardware description is a mapping (a profile's `hardware:` section, a YAML file given to
`moeport plan --hardware FILE`, or one shipped under moeport/plan/hardware/, named by its
file name: h800, h20, h200, mi300x, ascend-910b, gaudi3). Validation is as strict as the
rest of the profile: an unknown key, a wrong type or an impossible value is a UserError
with the key path.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeport.base.errors import UserError, format_validation_error
from moeport.yaml_file import read_yaml

#: The element sizes of the planner's dtypes, in bytes. `float8` is the planner's own name (the
#: runtime has no float8 dtype): e4m3 / e5m2 alike.
PLAN_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


class PlanSectionBase(BaseModel):
    """Strict, frozen, no unknown keys: the rules every profile section follows."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MatmulRates(PlanSectionBase):
    """Dense (not sparse) peak matrix-multiply rate per dtype, in TFLOP/s; at least one."""

    float32: float | None = Field(default=None, gt=0)
    bfloat16: float | None = Field(default=None, gt=0)
    float16: float | None = Field(default=None, gt=0)
    float8: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _at_least_one(self) -> MatmulRates:
        if not self.given():
            raise ValueError(f"expected a rate for at least one of {', '.join(PLAN_DTYPES)}")
        return self

    def given(self) -> dict[str, float]:
        """dtype -> TFLOP/s for the dtypes this hardware has a rate for."""
        return {dtype: rate for dtype in PLAN_DTYPES if (rate := getattr(self, dtype)) is not None}


class Efficiency(PlanSectionBase):
    """The achieved fraction of each peak (1.0: the numbers given are already achieved ones)."""

    matmul: float = Field(default=1.0, gt=0, le=1)
    memory: float = Field(default=1.0, gt=0, le=1)
    link: float = Field(default=1.0, gt=0, le=1)


class HardwareSpec(PlanSectionBase):
    """One device and its expert-parallel link, as the planner sees it (the `hardware:` section)."""

    name: str = Field(min_length=1)
    matmul_tflops: MatmulRates
    memory_bandwidth_gbps: float = Field(gt=0)  # GB/s (1e9 bytes/s)
    link_bandwidth_gbps: float = Field(gt=0)  # GB/s per device for expert-parallel traffic, each direction
    link_latency_us: float = Field(ge=0)  # per message
    efficiency: Efficiency = Efficiency()
    op_overhead_us: float = Field(default=0.0, ge=0)  # fixed cost per operator launch (host-bound devices)
    price_per_hour: float | None = Field(default=None, ge=0)  # per device, for the cost figure

    def flops_per_s(self, dtype: str, where: str) -> float:
        """Achieved matmul FLOP/s in `dtype`; a UserError naming `where` when this hardware has no rate for it."""
        rates = self.matmul_tflops.given()
        if dtype not in rates:
            raise UserError(f"{where}: {dtype}: hardware {self.name!r} has no matmul_tflops for it "
                            f"(it has {', '.join(rates)})")
        return rates[dtype] * 1e12 * self.efficiency.matmul

    @property
    def memory_bytes_per_s(self) -> float:
        """Achieved memory bandwidth, bytes/s."""
        return self.memory_bandwidth_gbps * 1e9 * self.efficiency.memory

    @property
    def link_bytes_per_s(self) -> float:
        """Achieved link bandwidth per device, bytes/s."""
        return self.link_bandwidth_gbps * 1e9 * self.efficiency.link


def shipped_hardware() -> dict[str, str]:
    """Shipped hardware name -> file path."""
    folder = importlib.resources.files("moeport.plan") / "hardware"
    return {entry.name[: -len(".yaml")]: str(entry) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def read_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; a UserError naming the file when it cannot be read or holds no mapping."""
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of {what} keys, got {type(data).__name__}")
    return data


def shipped_data(name: str) -> dict[str, Any]:
    """The mapping of the shipped hardware `name`; a ValueError listing the shipped ones if there is none
    (the profile's validator turns it into a message with the file and key path)."""
    shipped = shipped_hardware()
    if name not in shipped:
        raise ValueError(f"unknown hardware {name!r}; expected a mapping, or one of {', '.join(shipped)}")
    return read_yaml_mapping(shipped[name], "hardware")


def parse_hardware(data: Any, source: str, prefix: str = "") -> HardwareSpec:
    """Validate a hardware mapping read from `source` (key paths in messages start with `prefix`)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix or '(top level)'}: expected a mapping of hardware keys, "
                        f"got {type(data).__name__}")
    try:
        return HardwareSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc.errors()[0], prefix)) from None


def load_hardware(spec: str) -> HardwareSpec:
    """`--hardware NAME|FILE`: a YAML file if one exists at that path, else a shipped name."""
    if os.path.isfile(spec):
        return parse_hardware(read_yaml_mapping(spec, "hardware"), spec)
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        raise UserError(f"--hardware {spec}: no such file")
    try:
        data = shipped_data(spec)
    except ValueError as exc:
        raise UserError(f"--hardware {spec}: {exc}") from None
    return parse_hardware(data, shipped_hardware()[spec])


__all__ = [
    "PLAN_DTYPES",
    "Efficiency",
    "HardwareSpec",
    "MatmulRates",
    "load_hardware",
    "parse_hardware",
    "read_yaml_mapping",
    "shipped_data",
    "shipped_hardware",
]
