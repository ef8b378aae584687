"""What a flow asks its driver to do: one backend round trip, a sleep, or a loader call."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

__all__ = ["Call", "Flow", "Load", "Op", "Sleep"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """``store.<method>(*args)``: one backend round trip; the driver sends back its
    result or throws its exception into the flow.

    ``direct`` goes to the backend itself, past the circuit breaker: the journal's
    background replay is the breaker's probe (see :mod:`cachekit.core.journal`).
    """

    method: str
    args: tuple[Any, ...]
    direct: bool = False


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` (``time.sleep`` or ``asyncio.sleep``)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Load:
    """Call the user's loader (and ``await`` its result, for ``AsyncCache``)."""

    loader: Callable[[], Any]


Op: TypeAlias = Call | Sleep | Load
#: A decision procedure: yields operations, receives their results, returns ``T``.
Flow: TypeAlias = Generator[Op, Any, T]
