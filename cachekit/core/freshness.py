"""Stale-while-revalidate and probabilistic early refresh, over annotated entries.

Both are opt-in (``stale_ttl=``, ``early_refresh=``). An annotated entry carries, with
its value, the wall-clock time it stops being fresh and how long its load took, so
every process sharing the server reads the same facts:

- **Stale-while-revalidate.** The entry lives ``stale_ttl`` past its TTL. A read in
  that window takes a *refresh lease* (a separate key, so the stale value stays
  readable) and reloads; every other reader gets the stale value at once instead of
  waiting. If the reload fails, the stale value is served and the error counted.
- **Early refresh** (XFetch, "Optimal Probabilistic Cache Stampede Prevention",
  VLDB 2015). A fresh read refreshes early when
  ``now - delta * beta * ln(U) >= expiry`` with ``U`` uniform in (0, 1], ``delta``
  the measured load time: hot keys are reloaded by about one caller shortly before
  they expire, and almost never long before.

A refresh stores its value with ``compare_and_set`` against the entry it read, so a
write or invalidation that happened meanwhile wins, exactly as with miss leases.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cachekit.core import fills
from cachekit.core.ops import Call, Flow
from cachekit.entries import FOREVER, Entry, Loaded
from cachekit.exceptions import UNSTORABLE, CacheError
from cachekit.keys import make_backend_key
from cachekit.markers import new_lease
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore, TagsOf

# The refresh lease when leases are off: it must still expire if its holder dies.
_REFRESH_LEASE = 5.0

__all__ = ["serve"]


def serve(  # noqa: PLR0917 - the miss path's arguments, plus the entry
    core: CacheCore,
    bkey: str,
    entry: Entry,
    loader: Callable[[], Any],
    policy: FillPolicy,
    tags_of: TagsOf = None,
) -> Flow[Any]:
    """Return the entry's value, refreshing it first if it is stale or due early."""
    now = core.clock()
    stale = now >= entry.fresh_until
    if not stale and not _due_early(entry, now, policy.early_refresh):
        return entry.value
    return (yield from _refresh(core, bkey, entry, loader, policy, tags_of=tags_of, stale=stale))


def _due_early(entry: Entry, now: float, beta: float | None) -> bool:
    if beta is None or entry.fresh_until == FOREVER:
        return False
    draw = 1.0 - random.random()  # noqa: S311 - (0, 1], so the log is finite
    return now - entry.delta * beta * math.log(draw) >= entry.fresh_until


def _refresh(
    core: CacheCore,
    bkey: str,
    entry: Entry,
    loader: Callable[[], Any],
    policy: FillPolicy,
    *,
    tags_of: TagsOf,
    stale: bool,
) -> Flow[Any]:
    lease_key = make_backend_key(core.namespace + "!", bkey, core.key_policy)
    marker = new_lease(core.objects)
    lease_ttl = policy.lease_ttl or core.lease_ttl or _REFRESH_LEASE
    try:
        acquired = yield Call("add", (lease_key, marker, lease_ttl))
    except CacheError as exc:
        core.write_failed(exc)
        acquired = False
    if not acquired:  # another caller is refreshing: serve what we have
        return _served(core, entry, stale)
    try:
        result = yield from _reload(core, bkey, entry, loader, policy, tags_of, stale)
    except GeneratorExit:
        raise  # being closed: no more round trips; the refresh lease expires on its own
    except BaseException:
        yield from _release(core, lease_key, marker)
        raise
    yield from _release(core, lease_key, marker)
    return result


def _reload(  # noqa: PLR0917 - _refresh's arguments
    core: CacheCore,
    bkey: str,
    entry: Entry,
    loader: Callable[[], Any],
    policy: FillPolicy,
    tags_of: TagsOf,
    stale: bool,
) -> Flow[Any]:
    try:
        loaded = yield from fills.timed_load(core, loader, tags_of)
    except Exception as exc:  # serve-stale-on-error: the caller still gets a value
        core.counters.errors += 1
        core.log(f"refresh of {bkey!r} failed, serving the cached value: {exc!r}")
        return _served(core, entry, stale)
    yield from _store(core, bkey, entry, loaded, policy)
    return loaded.value


def _release(core: CacheCore, lease_key: str, marker: Any) -> Flow[None]:
    try:
        yield Call("compare_and_delete", (lease_key, marker))
    except CacheError as exc:
        core.write_failed(exc)  # the refresh lease expires on its own


def _store(
    core: CacheCore, bkey: str, entry: Entry, loaded: Loaded, policy: FillPolicy
) -> Flow[None]:
    try:
        packed = fills.pack_fill(core, bkey, loaded, policy)
    except UNSTORABLE as exc:
        core.write_failed(exc)
        return
    try:
        if packed is None:
            stored = yield Call("compare_and_delete", (bkey, entry.raw))
        else:
            stored = yield Call("compare_and_set", (bkey, entry.raw, *packed))
    except CacheError as exc:
        core.write_failed(exc)
        return
    if not stored:
        core.counters.fills_rejected += 1


def _served(core: CacheCore, entry: Entry, stale: bool) -> Any:
    if stale:
        core.counters.stale_served += 1
    return entry.value
