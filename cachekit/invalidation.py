"""Key sets (tags): invalidate every entry that depends on a tag, in bounded round trips.

Each tag has a *token*, a random string stored under its own key. A tagged entry
records the token of each of its tags when it is filled; a read compares them with the
current tokens (one ``get_many``, so a tagged hit costs two round trips and an
untagged one still one). Invalidating tags deletes their token keys: every entry that
recorded them stops matching at once, whatever their number, in two round trips per
call (one per server on a memcached pool). The same scheme serves every backend, and
nothing leaks: invalidated entries expire with their TTL, token keys with theirs (a
token key that expires early only turns its entries into misses).

The race to close is a fill that loaded *before* a tag was invalidated and stores
*after*. Tags usually come from the loaded value, so they are unknown when the load
starts; instead every invalidation also replaces the namespace's *epoch*, which a
tagged fill reads before it loads and again, with the tokens, before it stores. If the
epoch moved, some tag was invalidated during the load and the fill is not stored. This
is conservative (an unrelated invalidation costs a reload, never a stale entry).

Why losing a coordination key never stores a stale value. Any of them may vanish at
any moment: evicted under memory pressure, flushed when a pool node rejoins, or lost
in a server restart.

- The epoch: a fill never starts from "no epoch". If none exists, the fill creates
  one (``add`` of a random value) before it loads, so what it compares at fill time is
  a value no other writer can produce again. An invalidation during the load replaces
  it; if that replacement is then lost as well, the fill finds either no epoch or a new
  random one, and both differ from what it saw: rejected. (Comparing "absent" with
  "absent" was the hole: a fresh or idle namespace, an invalidation, the epoch lost,
  and the old value was stored.)
- A tag token: an entry stores the tokens it was filled under, and a read compares
  them with the current ones. A lost token reads as absent or, once a later fill
  creates it again, as a new random value: every entry that recorded the old one
  becomes a miss.
- A lease marker: the fill is a compare-and-set against the marker, so a lost marker
  rejects the fill (another caller may load meanwhile: a second loader call).

A server that brings old data *back* is another matter: a Redis with RDB/AOF
persistence that restarts from a snapshot restores entries deleted after it was taken
(see the README's section on persistence).

Every coordination key expires (tokens at twice the cache's TTL, or two days with
``ttl=None``; the epoch a day after its last change), so idle namespaces leave nothing
behind; an expiry is a loss like any other and costs only reloads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cachekit.backends.base import MISSING
from cachekit.entries import Entry
from cachekit.exceptions import BackendError, CacheError
from cachekit.keys import make_backend_key

if TYPE_CHECKING:
    from cachekit.backends.base import Backend
    from cachekit.breaker import CircuitBreaker
    from cachekit.cache import Cache

__all__ = [
    "UNBOUNDED_TOKEN_TTL",
    "TagGuard",
    "invalidate_tags",
    "replay_invalidations",
    "stale_entries",
]

_EPOCH = "epoch"
_EPOCH_TTL = 24 * 3600.0
#: How long tag tokens live when entries have no TTL (``ttl=None``): tokens always
#: expire, and one that goes before its entries only turns them into misses.
UNBOUNDED_TOKEN_TTL = 24 * 3600.0


def _token() -> str:
    return os.urandom(8).hex()


def _key(cache: Cache, name: str) -> str:
    # "ns#" can never be produced by a user key, which is always under "ns:".
    return make_backend_key(cache.namespace + "#", name, cache.store.capabilities.key_policy)


def _tag_key(cache: Cache, tag: str) -> str:
    return _key(cache, "tag:" + tag)


def _decode(raw: Any) -> str | None:
    if raw is MISSING:
        return None
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)


def _encode(cache: Cache, token: str) -> Any:
    return token if cache.store.capabilities.stores_objects else token.encode("ascii")


def invalidate_tags(cache: Cache, tags: Iterable[str], store: Backend | None = None) -> None:
    """Move the epoch, then drop the tags' tokens: two round trips for any number.

    ``store`` is the cache's own (behind its breaker) unless given.

    Raises:
        BackendError: the invalidation may not have happened; entries may be stale.
    """
    keys = [_tag_key(cache, tag) for tag in dict.fromkeys(tags)]
    if not keys:
        return
    store = cache.store if store is None else store
    # The epoch expires so that idle namespaces leave nothing behind; a missing epoch
    # only makes fills that straddle its expiry be rejected, never stored stale.
    try:
        store.set(_key(cache, _EPOCH), _encode(cache, _token()), _EPOCH_TTL)
    except CacheError:
        # The epoch's server failed, but the tokens may live on servers that answer (a
        # pool): drop them anyway, or their entries stay readable there for the whole
        # outage. The failure still propagates, so the tags stay journaled.
        store.delete_many(keys)
        raise
    store.delete_many(keys)


def replay_invalidations(
    cache: Cache,
    store: Backend,
    keys: list[str],
    tags: list[str],
    *,
    breaker: CircuitBreaker | None = None,
) -> None:
    """Replay journaled invalidations on ``store``; a success closes ``breaker``.

    Raises:
        BackendError: the server failed; they stay journaled.
    """
    if keys:
        store.delete_many(keys)
    if tags:
        invalidate_tags(cache, tags, store)
    if breaker is not None:
        breaker.succeeded()  # the server answered: this was the breaker's probe


class TagGuard:
    """The epoch seen before a tagged load; at fill time, the tokens to store with it.

    Raises:
        BackendError: the epoch could not be read or created; the fill must not be stored.
    """

    def __init__(self, cache: Cache, *, check_epoch: bool = True) -> None:
        self._cache = cache
        # A direct set is the newest value by definition: it needs no epoch.
        self._epoch = _current_epoch(cache) if check_epoch else None

    def tokens(self, tags: Iterable[str], ttl: float) -> dict[str, str] | None:
        """Each tag's current token, creating missing ones; ``None`` if the epoch moved.

        Raises:
            BackendError: the tokens could not be read; the fill must not be stored.
        """
        cache = self._cache
        check_epoch = self._epoch is not None
        wanted = {_tag_key(cache, tag): tag for tag in dict.fromkeys(tags)}
        epoch_key = _key(cache, _EPOCH)
        found = cache.store.get_many([epoch_key, *wanted] if check_epoch else list(wanted))
        if check_epoch and _decode(found.pop(epoch_key, MISSING)) != self._epoch:
            return None
        tokens = {wanted[key]: _decode(raw) or "" for key, raw in found.items()}
        missing = {key: _token() for key in wanted if key not in found}
        if missing:
            # A token outlives its entries' TTL where it can; if it goes first, its
            # entries become misses, never stale hits.
            added = cache.store.add_many(
                {key: _encode(cache, token) for key, token in missing.items()},
                2 * ttl,
            )
            if len(added) < len(missing):
                return None  # created concurrently: don't guess which token is current
            tokens.update({wanted[key]: token for key, token in missing.items()})
            # A token created here may postdate an invalidation that found none to
            # delete: the epoch, which invalidate_tags moves first, tells.
            if check_epoch and _decode(cache.store.get(epoch_key)) != self._epoch:
                return None
        return tokens


def _current_epoch(cache: Cache) -> str:
    """The namespace's epoch, created first if there is none (see the module docstring:
    a fill that saw "no epoch" could not tell a lost invalidation from none at all)."""
    key = _key(cache, _EPOCH)
    epoch = _decode(cache.store.get(key))
    if epoch is not None:
        return epoch
    token = _token()
    if cache.store.add(key, _encode(cache, token), _EPOCH_TTL):
        return token
    # Created concurrently, by a fill or an invalidation: that one is current.
    epoch = _decode(cache.store.get(key))
    if epoch is None:  # lost again at once; a later fill will try again
        raise BackendError("the tag epoch could not be created; the fill is not stored")
    return epoch


def stale_entries(cache: Cache, entries: Mapping[str, Entry]) -> set[str]:
    """The backend keys of tagged entries whose tags were invalidated since their fill.

    One ``get_many`` for all their tags. If the tokens cannot be read, every tagged
    entry counts as stale: a read then falls through to the loader, as on a miss.
    """
    tagged = {bkey: entry.tags for bkey, entry in entries.items() if entry.tags}
    if not tagged:
        return set()
    if cache.journal.tags:  # invalidations not replayed yet are honoured here
        pending = {bkey for bkey, tags in tagged.items() if cache.journal.tags & tags.keys()}
        if pending:
            return pending | stale_entries(
                cache, {bkey: entries[bkey] for bkey in tagged if bkey not in pending}
            )
    keys = {_tag_key(cache, tag) for tags in tagged.values() for tag in tags}
    try:
        current = {key: _decode(raw) for key, raw in cache.store.get_many(list(keys)).items()}
    except CacheError as exc:
        cache._read_failed(exc, count=0)
        return set(tagged)
    return {
        bkey
        for bkey, tags in tagged.items()
        if any(current.get(_tag_key(cache, tag)) != token for tag, token in tags.items())
    }
