"""The experts' kernels one device offers, each imported when first asked for and checked before use."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping

import torch

from moeport.base.errors import UserError
from moeport.kernels import KINDS
from moeport.kernels.checks import verify

Kernel = Callable[..., Any]


class OfferedKernels:
    """The kernels a device type offers the experts, by kind: "package.module:factory" strings (the
    factory returns the kernel, or None where it cannot run here) or the kernels themselves.

    Made by a Backend from its class attribute `expert_kernels`. Naming a kernel by a string
    keeps its module unimported until the model first asks for that kind; a module that does
    not import is a UserError naming it, never a silent fallback. Each kernel is checked once
    per dtype on a small problem against the definition; one that raises or answers wrong is
    not used, with a warning naming it.
    """

    def __init__(self, offered: Mapping[str, str | Kernel], device_type: str, owner: str = "") -> None:
        unknown = sorted(set(offered) - set(KINDS))
        if unknown:
            raise UserError(f"{owner}: expert_kernels: unknown kind {unknown[0]!r}; expected one of {', '.join(KINDS)}")
        self.offered = dict(offered)
        self.device_type = device_type
        self.owner = owner
        self._loaded: dict[str, tuple[str, Kernel | None]] = {}
        self._checked: dict[tuple[str, torch.dtype], Kernel | None] = {}

    def load(self, kind: str) -> tuple[str, Kernel | None]:
        """The name of the kernel of `kind` ("" if none is offered) and the kernel itself (None where
        there is none or its factory found nothing to run here), not yet checked."""
        if kind not in self._loaded:
            self._loaded[kind] = self._load(kind)
        return self._loaded[kind]

    def kernel(self, kind: str, device: torch.device, dtype: torch.dtype) -> Kernel | None:
        """The checked kernel of `kind` for tensors of this device and dtype, or None where there is none."""
        if device.type != self.device_type:
            return None
        key = (kind, dtype)
        if key not in self._checked:
            self._checked[key] = self._check(kind, device, dtype)
        return self._checked[key]

    def in_use(self, device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
        """For each kind, the name of the kernel the experts use on this device and dtype (None: none)."""
        return {kind: self.load(kind)[0] if self.kernel(kind, device, dtype) is not None else None for kind in KINDS}

    def _load(self, kind: str) -> tuple[str, Kernel | None]:
        target = self.offered.get(kind)
        if target is None:
            return "", None
        if not isinstance(target, str):
            return getattr(target, "__qualname__", repr(target)), target
        module_name, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"expert kernel {target!r} failed to import: {type(exc).__name__}: {exc}") from exc
        return target, factory()

    def _check(self, kind: str, device: torch.device, dtype: torch.dtype) -> Kernel | None:
        name, kernel = self.load(kind)
        if kernel is None:
            return None
        try:
            verify(kind, kernel, device, dtype)
        except NotImplementedError:  # not a dtype the kernel takes
            return None
        except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
            warnings.warn(f"the {kind} kernel {name} for {device.type} {dtype} failed its check ({type(exc).__name__}: "
                          f"{exc}); not used", stacklevel=3)
            return None
        return kernel
