"""The pieces a layer's step list is made of, and the state the steps share.

A layer is a flat list of steps over one `LayerState`: `Compute` steps run on the
compute stream; an `Issue` step starts a communication and returns a Handle; the
`Wait` step of the same name receives that Handle's result. A schedule is a driver
of the list: it runs the Compute steps in list order and decides only when each
communication is waited for.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

from moeport.collectives.base import Handle

LayerState = types.SimpleNamespace


@dataclasses.dataclass(frozen=True)
class Compute:
    """Local work on the compute stream."""

    name: str
    run: Callable[[LayerState], None]


@dataclasses.dataclass(frozen=True)
class Issue:
    """Start a communication named `name`; returns its Handle."""

    name: str
    run: Callable[[LayerState], Handle]


@dataclasses.dataclass(frozen=True)
class Wait:
    """Receive the result of the communication `name`."""

    name: str
    run: Callable[[LayerState, Any], None]


Step = Compute | Issue | Wait
