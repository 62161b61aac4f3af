"""Finding backends: built-ins, plugins under the `moeport.backends` entry points,
and classes named directly as "package.module:Class".

Classes are named by strings and imported only when asked for, so listing the
backends never imports a vendor's package. A plugin that fails to import is an
error naming the plugin and its cause, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata

from moeport.backends.base import Backend
from moeport.base.errors import UserError

ENTRY_POINT_GROUP = "moeport.backends"

BUILTINS: dict[str, str] = {
    "cpu": "moeport.backends.cpu:CPUBackend",
    "cuda": "moeport.backends.cuda:CUDABackend",
    "rocm": "moeport.backends.cuda:ROCmBackend",
    "generic": "moeport.backends.generic:GenericBackend",
}


def plugins() -> dict[str, str]:
    """Installed plugins: entry-point name -> "package.module:Class"."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in sorted(found, key=lambda ep: ep.name)}


def available_names() -> list[str]:
    """Every name a profile's `backend:` may use, besides "auto" and "module:Class"."""
    return sorted(set(BUILTINS) | set(plugins()))


def load_class(target: str, label: str) -> type[Backend]:
    """Import "package.module:Class" and check it is a Backend; `label` names it in errors."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"backend {label!r}: expected 'package.module:Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of a plugin is the user's to fix
        raise UserError(f"backend plugin {label!r} ({target}) failed to import: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise UserError(f"backend plugin {label!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UserError(f"backend plugin {label!r}: {target} is not a subclass of moeport.backends.Backend")
    return cls


def resolve_class(name: str) -> type[Backend]:
    """The Backend class a profile's `backend:` value names (not "auto")."""
    if ":" in name:
        return load_class(name, name)
    if name in BUILTINS:
        return load_class(BUILTINS[name], name)
    found = plugins()
    if name in found:
        return load_class(found[name], name)
    raise UserError(f"unknown backend {name!r}; available: {', '.join(['auto', *available_names()])}")


def instantiate(cls: type[Backend], device_type: str | None = None, collectives: str | None = None) -> Backend:
    """Create a backend, passing the profile's device type / collectives where the class takes them."""
    from moeport.backends.generic import GenericBackend

    if issubclass(cls, GenericBackend):
        return cls(device_type=device_type, collectives=collectives)
    return cls()


@dataclasses.dataclass
class Selection:
    """The backend chosen for a profile, and why each other candidate was not."""

    backend: Backend
    reason: str
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)


def auto_candidates() -> list[tuple[str, str]]:
    """(label, target) in the order `backend: auto` tries them."""
    out = [("cuda", BUILTINS["cuda"])]
    out += list(plugins().items())
    out += [("generic", BUILTINS["generic"]), ("cpu", BUILTINS["cpu"])]
    return out


def select(name: str, device_type: str | None = None, collectives: str | None = None) -> Selection:
    """The backend for a profile: by name, by "module:Class", or the first available for "auto".

    A named backend whose device is absent is a UserError saying which device is missing.
    """
    if name != "auto":
        backend = instantiate(resolve_class(name), device_type, collectives)
        missing = backend.unavailable_reason()
        if missing is not None:
            raise UserError(f"backend {name!r} cannot start: {missing}")
        return Selection(backend, f"named by the profile ({name})")
    rejected: dict[str, str] = {}
    for label, target in auto_candidates():
        backend = instantiate(load_class(target, label))
        missing = backend.unavailable_reason()
        if missing is None:
            return Selection(backend, f"auto: first available of {', '.join(l for l, _ in auto_candidates())}", rejected)
        rejected[label] = missing
    raise AssertionError("the cpu backend is always available")
