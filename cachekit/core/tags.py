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
from cachekit.core.ops import Call, Flow
from cachekit.entries import Entry
from cachekit.exceptions import BackendError, CacheError
from cachekit.keys import make_backend_key

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore

__all__ = [
    "UNBOUNDED_TOKEN_TTL",
    "current_epoch",
    "invalidate",
    "stale_entries",
    "token_ttl",
    "tokens",
]

_EPOCH = "epoch"
_EPOCH_TTL = 24 * 3600.0
#: How long tag tokens live when entries have no TTL (``ttl=None``): tokens always
#: expire, and one that goes before its entries only turns them into misses.
UNBOUNDED_TOKEN_TTL = 24 * 3600.0


def _token() -> str:
    return os.urandom(8).hex()


def _key(core: CacheCore, name: str) -> str:
    # "ns#" can never be produced by a user key, which is always under "ns:".
    return make_backend_key(core.namespace + "#", name, core.key_policy)


def _tag_key(core: CacheCore, tag: str) -> str:
    return _key(core, "tag:" + tag)


def _decode(raw: Any) -> str | None:
    if raw is MISSING:
        return None
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)


def _encode(core: CacheCore, token: str) -> Any:
    return token if core.objects else token.encode("ascii")


def token_ttl(core: CacheCore) -> float:
    """The TTL tag tokens are based on (they live twice as long): the entries' TTL, or
    a day for entries without one, so that tokens always expire."""
    base = UNBOUNDED_TOKEN_TTL if core.ttl is None else core.ttl
    return max(base, core.none_ttl or 0.0)


def invalidate(core: CacheCore, tags: Iterable[str], *, direct: bool = False) -> Flow[None]:
    """Move the epoch, then drop the tags' tokens: two round trips for any number.

    ``direct`` goes past the breaker (the journal's background replay).

    Raises:
        BackendError: the invalidation may not have happened; entries may be stale.
    """
    keys = [_tag_key(core, tag) for tag in dict.fromkeys(tags)]
    if not keys:
        return
    # The epoch expires so that idle namespaces leave nothing behind; a missing epoch
    # only makes fills that straddle its expiry be rejected, never stored stale.
    try:
        yield Call("set", (_key(core, _EPOCH), _encode(core, _token()), _EPOCH_TTL), direct)
    except CacheError:
        # The epoch's server failed, but the tokens may live on servers that answer (a
        # pool): drop them anyway, or their entries stay readable there for the whole
        # outage. The failure still propagates, so the tags stay journaled.
        yield Call("delete_many", (keys,), direct)
        raise
    yield Call("delete_many", (keys,), direct)


def current_epoch(core: CacheCore) -> Flow[str]:
    """The namespace's epoch, read before a tagged load; created first if there is none
    (see the module docstring: a fill that saw "no epoch" could not tell a lost
    invalidation from none at all).

    Raises:
        BackendError: the epoch could not be read or created; the fill must not be stored.
    """
    key = _key(core, _EPOCH)
    epoch = _decode((yield Call("get", (key,))))
    if epoch is not None:
        return epoch
    token = _token()
    if (yield Call("add", (key, _encode(core, token), _EPOCH_TTL))):
        return token
    # Created concurrently, by a fill or an invalidation: that one is current.
    epoch = _decode((yield Call("get", (key,))))
    if epoch is None:  # lost again at once; a later fill will try again
        raise BackendError("the tag epoch could not be created; the fill is not stored")
    return epoch


def tokens(
    core: CacheCore, epoch: str | None, tags: Iterable[str], ttl: float
) -> Flow[dict[str, str] | None]:
    """Each tag's current token, creating missing ones; ``None`` if the epoch moved
    since :func:`current_epoch` returned ``epoch`` (``None``: a direct set, the newest
    value by definition, checks no epoch).

    Raises:
        BackendError: the tokens could not be read; the fill must not be stored.
    """
    check_epoch = epoch is not None
    wanted = {_tag_key(core, tag): tag for tag in dict.fromkeys(tags)}
    epoch_key = _key(core, _EPOCH)
    found = yield Call("get_many", ([epoch_key, *wanted] if check_epoch else list(wanted),))
    if check_epoch and _decode(found.pop(epoch_key, MISSING)) != epoch:
        return None
    current = {wanted[key]: _decode(raw) or "" for key, raw in found.items()}
    missing = {key: _token() for key in wanted if key not in found}
    if missing:
        # A token outlives its entries' TTL where it can; if it goes first, its
        # entries become misses, never stale hits.
        encoded = {key: _encode(core, token) for key, token in missing.items()}
        added = yield Call("add_many", (encoded, 2 * ttl))
        if len(added) < len(missing):
            return None  # created concurrently: don't guess which token is current
        current.update({wanted[key]: token for key, token in missing.items()})
        # A token created here may postdate an invalidation that found none to
        # delete: the epoch, which invalidate() moves first, tells.
        if check_epoch and _decode((yield Call("get", (epoch_key,)))) != epoch:
            return None
    return current


def stale_entries(core: CacheCore, entries: Mapping[str, Entry]) -> Flow[set[str]]:
    """The backend keys of tagged entries whose tags were invalidated since their fill.

    One ``get_many`` for all their tags. If the tokens cannot be read, every tagged
    entry counts as stale: a read then falls through to the loader, as on a miss.
    """
    tagged = {bkey: entry.tags for bkey, entry in entries.items() if entry.tags}
    if not tagged:
        return set()
    pending: set[str] = set()
    if core.journal.tags:  # invalidations not replayed yet are honoured here
        pending = {bkey for bkey, tags in tagged.items() if core.journal.tags & tags.keys()}
        tagged = {bkey: tags for bkey, tags in tagged.items() if bkey not in pending}
        if not tagged:
            return pending
    keys = list({_tag_key(core, tag) for tags in tagged.values() for tag in tags})
    try:
        found = yield Call("get_many", (keys,))
    except CacheError as exc:
        core.read_failed(exc, count=0)
        return pending | set(tagged)
    current = {key: _decode(raw) for key, raw in found.items()}
    return pending | {
        bkey
        for bkey, tags in tagged.items()
        if any(current.get(_tag_key(core, tag)) != token for tag, token in tags.items())
    }
