"""Turning a loader's result into what the cache stores: timed, tagged, encoded.

Every miss path (leases, refreshes, the unleased baseline) goes through these, so the
rules for what may be stored live in one place: a fill rejected by a tag invalidation,
a key with an invalidation still to replay, a ``None`` with negative caching off, and
an unencodable or oversize value are never stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cachekit.core import tags as tag_flows
from cachekit.core.ops import Call, Flow, Load
from cachekit.entries import Loaded, pack
from cachekit.exceptions import UNSTORABLE, CacheError
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore, TagsOf

__all__ = ["load_uncached", "pack_fill", "store_unleased", "timed_load"]


def timed_load(core: CacheCore, loader: Callable[[], Any], tags_of: TagsOf = None) -> Flow[Loaded]:
    """Call the loader, count it and time it (early refresh reads the time); for a
    tagged fill, read the tag epoch first and the tokens after (invalidation)."""
    epoch: str | None = None
    if tags_of is not None:
        try:
            epoch = yield from tag_flows.current_epoch(core)
        except CacheError as exc:
            core.write_failed(exc)
    start = time.monotonic()
    value = yield Load(loader)
    core.counters.loads += 1
    loaded = Loaded(value, time.monotonic() - start)
    if tags_of is not None:
        loaded.tags = yield from _tokens(core, epoch, tags_of(value))
        loaded.rejected = loaded.tags is None
    return loaded


def _tokens(core: CacheCore, epoch: str | None, tags: Iterable[str]) -> Flow[dict[str, str] | None]:
    """The tag tokens to store, or ``None`` when the fill must not be stored."""
    if epoch is None:  # the epoch could not be read before the load
        return None
    try:
        tokens = yield from tag_flows.tokens(core, epoch, tags, tag_flows.token_ttl(core))
    except CacheError as exc:
        core.write_failed(exc)
        return None
    if tokens is None:
        core.counters.fills_rejected += 1  # a tag was invalidated during the load
    return tokens


def pack_fill(
    core: CacheCore, bkey: str, loaded: Loaded, policy: FillPolicy
) -> tuple[Any, float | None] | None:
    """Encode a loaded value and its physical TTL; ``None`` if it must not be stored.

    Raises:
        SerializationError: the serializer cannot encode the value.
        ValueTooLarge: the encoded value is over the cache's size limit.
    """
    if loaded.rejected:
        return None
    journal = core.journal
    if journal and (bkey in journal.keys or (loaded.tags and journal.tags & loaded.tags.keys())):
        return None  # an invalidation of it is still to be replayed
    seconds = core.resolve_ttl(policy.ttl, loaded.value)
    if seconds == 0:  # a None with negative caching off
        return None
    if policy.annotated or loaded.tags:
        return pack(core, bkey, loaded, seconds, policy.stale_ttl)
    return core.encode(bkey, loaded.value), seconds


def store_unleased(core: CacheCore, bkey: str, loaded: Loaded, policy: FillPolicy) -> Flow[None]:
    """Leases off: an unconditional set, open to the stale-set race leases close."""
    try:
        packed = pack_fill(core, bkey, loaded, policy)
        if packed is not None:
            yield Call("set", (bkey, *packed))
    except (CacheError, *UNSTORABLE) as exc:
        core.write_failed(exc)


def load_uncached(core: CacheCore, loader: Callable[[], Any]) -> Flow[Any]:
    """Call the loader without storing: the cache failed or a lease holder hung."""
    value = yield Load(loader)
    core.counters.loads += 1
    return value
