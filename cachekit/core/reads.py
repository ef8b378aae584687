"""Reads: what a backend reply means (a value, an annotated entry, a miss), and the
slow paths a hit rarely takes (tag checks, undecodable entries, pending invalidations).

The hit path itself is the facades' prebuilt closure: one backend call, then
:func:`first_look`, a plain function; only what it cannot settle runs a flow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from cachekit.backends.base import MISSING
from cachekit.core import journal as journal_flows
from cachekit.core import tags as tag_flows
from cachekit.core.ops import Call, Flow
from cachekit.core.state import BAD
from cachekit.entries import Entry
from cachekit.exceptions import CacheError
from cachekit.markers import Marker

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore

__all__ = [
    "NOT_PLAIN",
    "FollowUp",
    "drop_bad",
    "drop_invalidated",
    "first_look",
    "follow_up",
    "lookup",
    "lookup_many",
    "read_without_loader",
]


#: What an object backend's ``get`` may return that is not a plain value: a miss, a
#: lease marker, or an annotated entry.
NOT_PLAIN: Final = frozenset({type(MISSING), Marker, Entry})


class FollowUp:
    """What :func:`first_look` returns for a reply it cannot settle without I/O."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def first_look(core: CacheCore, bkey: str, raw: Any) -> Any:
    """A backend reply as the hit path returns it: the value (or an untagged
    :class:`Entry`), MISSING (counted), or a :class:`FollowUp` for :func:`follow_up`."""
    if raw is not MISSING:
        value = core.decode(bkey, raw)
        if value is BAD or (type(value) is Entry and value.tags):
            return FollowUp(value)
        if value is not MISSING:
            core.counters.hits += 1
            return value
    core.counters.misses += 1
    return MISSING


def follow_up(core: CacheCore, bkey: str, value: Any) -> Flow[Any]:
    """Settle what :func:`first_look` could not: delete an undecodable entry, check a
    tagged one's tokens. Returns the value, the entry, or MISSING (counted)."""
    if value is BAD:
        yield from drop_bad(core, bkey)
    elif not (yield from drop_invalidated(core, {bkey: value})):
        core.counters.hits += 1
        return value
    core.counters.misses += 1
    return MISSING


def lookup(core: CacheCore, bkey: str) -> Flow[Any]:
    """The whole read, with the journal settled first: a key whose invalidation is still
    to be replayed is a miss."""
    if core.journal and not (yield from journal_flows.settle(core)) and bkey in core.journal.keys:
        core.counters.misses += 1
        return MISSING
    try:
        raw = yield Call("get", (bkey,))
    except CacheError as exc:
        core.read_failed(exc)
        return MISSING
    value = first_look(core, bkey, raw)
    if type(value) is FollowUp:
        return (yield from follow_up(core, bkey, value.value))
    return value


def lookup_many(core: CacheCore, bkeys: list[str]) -> Flow[dict[str, Any]]:
    """``{bkey: value}`` for the keys that hit, in one ``get_many``; annotated entries
    are returned as their values (see :func:`read_without_loader`)."""
    if core.journal and not (yield from journal_flows.settle(core)):
        pending = [bkey for bkey in bkeys if bkey in core.journal.keys]
        core.counters.misses += len(pending)
        bkeys = [bkey for bkey in bkeys if bkey not in pending]
    if not bkeys:
        return {}
    try:
        raw = yield Call("get_many", (bkeys,))
    except CacheError as exc:
        core.read_failed(exc, count=len(bkeys))
        return {}
    decoded = {bkey: core.decode(bkey, data) for bkey, data in raw.items()}
    for bkey in [bkey for bkey, value in decoded.items() if value is BAD]:
        yield from drop_bad(core, bkey)
    entries = {bkey: value for bkey, value in decoded.items() if type(value) is Entry}
    invalidated = (yield from drop_invalidated(core, entries)) if entries else set()
    found = {}
    for bkey, value in decoded.items():
        if type(value) is Entry:
            if bkey not in invalidated:
                found[bkey] = read_without_loader(core, value)
        elif value is not MISSING and value is not BAD:
            found[bkey] = value
    core.counters.hits += len(found)
    core.counters.misses += len(bkeys) - len(found)
    return found


def drop_invalidated(core: CacheCore, entries: Mapping[str, Entry]) -> Flow[set[str]]:
    """Delete tagged entries whose tags were invalidated; return their keys."""
    gone = yield from tag_flows.stale_entries(core, entries)
    for bkey in gone:
        try:
            yield Call("compare_and_delete", (bkey, entries[bkey].raw))
        except CacheError as exc:
            core.write_failed(exc)  # still a miss; it stays unreadable
    return gone


def drop_bad(core: CacheCore, bkey: str) -> Flow[None]:
    try:
        yield Call("delete", (bkey,))
    except CacheError as exc:
        core.read_failed(exc, count=0)


def read_without_loader(core: CacheCore, entry: Entry) -> Any:
    """A read with nothing to refresh from (``get``, ``get_many``): the value as is."""
    if core.clock() >= entry.fresh_until:
        core.counters.stale_served += 1
    return entry.value
