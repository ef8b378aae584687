"""Leases on the miss path: no stale sets, and one loader call per key per miss.

The protocol is the one of "Scaling Memcache at Facebook" (NSDI 2013), built only on
the backend's atomic primitives:

1. A caller that misses stores a fresh, random lease marker under the key with
   ``add`` (set-if-absent), *before* it runs the loader.
2. The holder fills with ``compare_and_set(key, marker, value)``: the value lands only
   if its marker is still there. Any ``delete``, ``set`` or invalidation in between
   removed or replaced the marker, so a value read before that write can never be
   stored after it (the fill-after-invalidate race).
3. Callers that miss while a lease is held wait, polling the key with jittered,
   growing intervals, and return the value the holder stores. If the marker
   disappears (released, expired, invalidated) they compete for a new lease, so
   exactly one of them loads next.
4. A holder whose loader raises releases its lease with ``compare_and_delete``; a
   holder that dies leaves a lease that expires after ``lease_ttl``.

A holder that is cancelled or interrupted while loading releases its lease on the way
out, as one whose loader raised.

Limits: a holder that outlives ``lease_ttl`` loses its lease (its fill is rejected
and another caller loads). A server that evicts a lease early only costs a second
loader call; neither can store stale data. Waiters give up after ``lease_ttl`` plus
half a second (plus the backend's TTL slack) and call the loader themselves, without
storing its result.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cachekit.backends.base import MISSING
from cachekit.core import fills
from cachekit.core.ops import Call, Flow, Sleep
from cachekit.core.reads import drop_bad, drop_invalidated
from cachekit.core.state import BAD
from cachekit.entries import Entry, Loaded
from cachekit.exceptions import UNSTORABLE, BackendTimeout, CacheError, ReentrantLoadError
from cachekit.markers import is_marker, new_lease
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore, TagsOf

__all__ = [
    "GRACE",
    "Outcome",
    "holding",
    "load_and_fill",
    "lost",
    "reclaim",
    "refuse_reentry",
    "release",
    "remember",
]

K = TypeVar("K")

#: Waiters past the lease's own expiry allow this much, plus the backend's TTL slack
#: (memcached keeps a lease up to one second past lease_ttl), for it to go and a new
#: holder to appear; less would let every waiter load at once.
GRACE = 0.5
# Lost leases remembered per cache, at most (past it, they expire on their own).
_LOST_LIMIT = 10_000


# The leases this context holds while its loader runs, as (backend id, backend key): a
# loader that asks for its own key would otherwise wait out its own lease.
_HOLDING: contextvars.ContextVar[frozenset[tuple[int, str]]] = contextvars.ContextVar(
    "cachekit_holding", default=frozenset()
)


@contextlib.contextmanager
def holding(core: CacheCore, bkeys: Iterable[str]) -> Iterator[None]:
    token = _HOLDING.set(_HOLDING.get() | {(core.identity, bkey) for bkey in bkeys})
    try:
        yield
    finally:
        # A flow closed from outside its task (its event loop gone) runs this in
        # another context, where the token does not belong: nothing to undo there.
        with contextlib.suppress(ValueError):
            _HOLDING.reset(token)


def refuse_reentry(core: CacheCore, bkeys: Iterable[str]) -> None:
    """Fail fast when a loader asks for a key whose lease its own call holds.

    Raises:
        ReentrantLoadError: the loader of ``bkey`` needs ``bkey`` itself.
    """
    holding = _HOLDING.get()
    if holding:
        for bkey in bkeys:
            if (core.identity, bkey) in holding:
                raise ReentrantLoadError(
                    f"the loader of {bkey!r} asked for {bkey!r} itself; it would wait "
                    "for its own lease. Break the recursion, or load that value uncached."
                )


class Outcome:
    """What became of a miss: ``rejected`` is true when its fill was refused because the
    key was written or invalidated (a tag of it) while it loaded, so the value may be
    older than what a caller that started later must see. Callers in the same process
    that share one miss path take its value unless it was (see
    ``AsyncCache.load_or_serve``)."""

    __slots__ = ("rejected",)

    def __init__(self) -> None:
        self.rejected = False


class _GiveUp(enum.Enum):
    """The holder outlived its lease and the grace period: stop waiting."""

    GIVE_UP = "GIVE_UP"


def load_and_fill(  # noqa: PLR0917 - the miss path's arguments
    core: CacheCore,
    bkey: str,
    loader: Callable[[], Any],
    policy: FillPolicy,
    tags_of: TagsOf = None,
    outcome: Outcome | None = None,
) -> Flow[Any]:
    """The miss path after a lookup missed: under a lease unless leases are off."""
    if core.journal and bkey in core.journal.keys:
        # A delete of it is still to be replayed, so the server may hold the old value:
        # a lease's add would find it taken and a waiter would return it. It is not
        # filled either (see fills.pack_fill): load without the cache.
        return (yield from fills.load_uncached(core, loader))
    if policy.lease_ttl is not None:
        return (yield from _load_under_lease(core, bkey, loader, policy, tags_of, outcome))
    loaded = yield from fills.timed_load(core, loader, tags_of)
    yield from fills.store_unleased(core, bkey, loaded, policy)
    return loaded.value


def _load_under_lease(  # noqa: PLR0917 - as load_and_fill
    core: CacheCore,
    bkey: str,
    loader: Callable[[], Any],
    policy: FillPolicy,
    tags_of: TagsOf,
    outcome: Outcome | None,
) -> Flow[Any]:
    """The miss path: take the lease and load, or wait for the holder's value."""
    lease_ttl = policy.lease_ttl
    assert lease_ttl is not None  # noqa: S101 - the caller checked; narrows the type
    refuse_reentry(core, (bkey,))
    deadline = None
    if core.lost_leases and not (yield from reclaim(core, bkey)):
        return (yield from fills.load_uncached(core, loader))
    while True:
        marker = new_lease(core.objects)
        try:
            acquired = yield Call("add", (bkey, marker, lease_ttl))
        except CacheError as exc:
            lost(core, {bkey: marker} if isinstance(exc, BackendTimeout) else {}, exc)
            return (yield from fills.load_uncached(core, loader))
        if acquired:
            holder = _load_as_holder(core, bkey, marker, loader, policy, tags_of, outcome)
            return (yield from holder)
        if deadline is None:
            core.counters.lease_waits += 1
            slack = core.capabilities.ttl_slack
            deadline = time.monotonic() + lease_ttl + GRACE + slack
        value = yield from _wait_for_holder(core, bkey, deadline)
        if value is _GiveUp.GIVE_UP:
            return (yield from fills.load_uncached(core, loader))
        if value is not MISSING:
            return value
        # MISSING: the lease was released, expired or invalidated; compete again, after
        # a short pause and within the deadline: an entry that can be neither used nor
        # deleted would otherwise make this loop spin.
        if time.monotonic() >= deadline:
            return (yield from fills.load_uncached(core, loader))
        pause = core.lease_poll / 8 * random.uniform(0.5, 1.5)  # noqa: S311
        yield Sleep(max(0.0, min(pause, deadline - time.monotonic())))


def _wait_for_holder(core: CacheCore, bkey: str, deadline: float) -> Flow[Any]:
    """Poll until the key holds a value (returned), no lease (MISSING), or time is up."""
    delay = core.lease_poll / 8
    while True:
        try:
            raw = yield Call("get", (bkey,))
        except CacheError as exc:
            core.read_failed(exc, count=0)
            return _GiveUp.GIVE_UP
        if raw is MISSING:
            return MISSING
        if not is_marker(raw):
            return (yield from _holders_value(core, bkey, raw))
        if time.monotonic() >= deadline:
            return _GiveUp.GIVE_UP
        # Full jitter keeps waiters from polling in lockstep.
        # Never past the deadline: a waiter then gives up and loads on its own.
        pause = delay * random.uniform(0.5, 1.0)  # noqa: S311 - never over lease_poll
        yield Sleep(max(0.0, min(pause, deadline - time.monotonic())))
        delay = min(delay * 2, core.lease_poll)


def _holders_value(core: CacheCore, bkey: str, raw: Any) -> Flow[Any]:
    """The value a holder stored, or MISSING if it is undecodable or its tags were
    invalidated (either way it is deleted now)."""
    value = core.decode(bkey, raw)
    if value is BAD:
        yield from drop_bad(core, bkey)
        return MISSING
    if type(value) is not Entry:
        return value
    if value.tags and (yield from drop_invalidated(core, {bkey: value})):
        return MISSING
    return value.value


def _load_as_holder(  # noqa: PLR0917 - internal; mirrors load_under_lease
    core: CacheCore,
    bkey: str,
    marker: Any,
    loader: Callable[[], Any],
    policy: FillPolicy,
    tags_of: TagsOf,
    outcome: Outcome | None,
) -> Flow[Any]:
    try:
        with holding(core, (bkey,)):
            loaded = yield from fills.timed_load(core, loader, tags_of)
    except GeneratorExit:  # being closed: no more round trips; the next miss reclaims it
        remember(core, {bkey: marker})
        raise
    except BaseException:
        # Raised or cancelled: let a waiter take over now, not at lease expiry.
        yield from release(core, bkey, marker)
        raise
    return (yield from _fill(core, bkey, marker, loaded, policy, outcome))


def _fill(  # noqa: PLR0917 - internal; the holder's state
    core: CacheCore,
    bkey: str,
    marker: Any,
    loaded: Loaded,
    policy: FillPolicy,
    outcome: Outcome | None,
) -> Flow[Any]:
    """Store the holder's value over its lease marker; return the value either way."""
    value = loaded.value
    try:
        packed = fills.pack_fill(core, bkey, loaded, policy)
    except UNSTORABLE as exc:
        # The call must still work; the error is the caller's to see in stats and logs.
        yield from release(core, bkey, marker)
        core.write_failed(exc)
        return value
    except BaseException:
        yield from release(core, bkey, marker)  # never leave waiters to sit out the lease
        raise
    if packed is None:  # nothing to store: a tag invalidated, or a None not cached
        if outcome is not None:
            outcome.rejected = loaded.rejected
        yield from release(core, bkey, marker)
        return value
    try:
        stored = yield Call("compare_and_set", (bkey, marker, *packed))
    except CacheError as exc:
        lost(core, {bkey: marker}, exc)
        return value
    except BaseException:
        remember(core, {bkey: marker})  # interrupted mid-fill: the next miss reclaims it
        raise
    if not stored:
        core.counters.fills_rejected += 1
        if outcome is not None:
            outcome.rejected = True
    return value


def release(core: CacheCore, bkey: str, marker: Any) -> Flow[None]:
    try:
        yield Call("compare_and_delete", (bkey, marker))
    except CacheError as exc:
        lost(core, {bkey: marker}, exc)
    except BaseException:
        remember(core, {bkey: marker})  # interrupted again: the next miss reclaims it
        raise


def lost(core: CacheCore, markers: Mapping[str, Any], exc: CacheError) -> None:
    """Lease writes failed in flight, so their markers may sit on the server held by
    nobody: an ``add`` that timed out yet landed once the server woke up, a lease whose
    fill or release never arrived. Waiters would sit such a marker out for
    ``lease_ttl``; remembered here, it is deleted by the next miss on its key."""
    core.write_failed(exc)
    remember(core, markers)


def remember(core: CacheCore, markers: Mapping[str, Any]) -> None:
    if len(core.lost_leases) + len(markers) <= _LOST_LIMIT:
        core.lost_leases.update(markers)


def reclaim(core: CacheCore, bkey: str) -> Flow[bool]:
    """Delete this cache's lost lease on ``bkey``, if any (only that marker: never a
    value or another caller's lease). False if the server failed: don't wait on it."""
    marker = core.lost_leases.pop(bkey, MISSING)
    if marker is MISSING:
        return True
    try:
        yield Call("compare_and_delete", (bkey, marker))
    except CacheError as exc:
        core.lost_leases.setdefault(bkey, marker)
        core.write_failed(exc)
        return False
    return True
