"""How one caller fills a miss: TTL, lease, stale window and early refresh, resolved once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

from cachekit.exceptions import ConfigurationError
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault, to_seconds

__all__ = ["FillPolicy", "PolicyOptions", "resolve"]


@dataclass(frozen=True, slots=True)
class FillPolicy:
    """The options of one decorator, view or call, with the cache's defaults applied.

    Attributes:
        ttl: the entry's time to live (``USE_DEFAULT``: the cache's, or ``none_ttl``
            for a ``None`` value).
        lease_ttl: the miss's lease, or ``None`` for no lease.
        stale_ttl: how long past its TTL an entry may still be served while one
            caller reloads it (stale-while-revalidate), or ``None``.
        early_refresh: the XFetch ``beta`` (1.0 is the paper's default), or ``None``.
    """

    ttl: TTL | UseDefault
    lease_ttl: float | None
    stale_ttl: float | None
    early_refresh: float | None

    @property
    def annotated(self) -> bool:
        """Whether entries carry the metadata (expiry, load time) these features read."""
        return self.stale_ttl is not None or self.early_refresh is not None


class PolicyOptions(TypedDict, total=False):
    """The per-caller overrides every strategy accepts beside ``ttl``, as keywords."""

    lease_ttl: TTL
    stale_ttl: TTL
    early_refresh: float | None


def resolve(
    defaults: FillPolicy,
    *,
    ttl: TTL | UseDefault = USE_DEFAULT,
    lease_ttl: TTL | UseDefault = USE_DEFAULT,
    stale_ttl: TTL | UseDefault = USE_DEFAULT,
    early_refresh: float | UseDefault | None = USE_DEFAULT,
) -> FillPolicy:
    """Apply per-caller overrides to a cache's defaults, validating each.

    Raises:
        ConfigurationError: a non-positive duration or ``early_refresh``.
    """
    if ttl is not USE_DEFAULT:
        to_seconds(ttl)  # validate now, not on the first miss
    return FillPolicy(
        ttl=ttl,
        lease_ttl=defaults.lease_ttl
        if lease_ttl is USE_DEFAULT
        else to_seconds(lease_ttl, what="lease_ttl"),
        stale_ttl=defaults.stale_ttl
        if stale_ttl is USE_DEFAULT
        else to_seconds(stale_ttl, what="stale_ttl"),
        early_refresh=defaults.early_refresh
        if early_refresh is USE_DEFAULT
        else _beta(early_refresh),
    )


def _beta(beta: float | None) -> float | None:
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta):
        raise ConfigurationError(f"early_refresh must be a positive number, got {beta!r}")
    if beta <= 0:
        raise ConfigurationError(f"early_refresh must be a positive number, got {beta!r}")
    return float(beta)
