"""The batch miss path: one round trip per step for any number of keys.

``get_many`` on a view misses on many keys at once: one ``add_many`` takes their leases,
one ``load_many`` loads the keys leased, one ``compare_and_set_many`` per TTL fills
them; keys leased by someone else are waited for one by one, through the single-key
miss path of :mod:`cachekit.core.leases`, whose rules (and lease bookkeeping) these are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cachekit.core import fills
from cachekit.core.leases import (
    holding,
    load_and_fill,
    lost,
    reclaim,
    refuse_reentry,
    release,
    remember,
)
from cachekit.core.ops import Call, Flow
from cachekit.entries import Loaded
from cachekit.exceptions import UNSTORABLE, BackendTimeout, CacheError
from cachekit.markers import new_lease
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore

__all__ = ["load_many_under_lease"]

K = TypeVar("K")


def load_many_under_lease(
    core: CacheCore,
    wanted: Mapping[str, K],
    load_many: Callable[[list[K]], Any],
    load_one: Callable[[K], Any],
    *,
    policy: FillPolicy,
    tags_of: Callable[[K, Any], Iterable[str]] | None = None,
) -> Flow[dict[str, Any]]:
    """The batch miss path: one ``add_many`` for the leases, one ``load_many`` for the
    keys leased, one ``compare_and_set_many`` per TTL to fill them. Keys leased by
    someone else are waited for one by one. Returns ``{bkey: value or None}``."""
    assert policy.lease_ttl is not None  # noqa: S101 - the caller checked; narrows the type
    refuse_reentry(core, wanted)
    for bkey in [bkey for bkey in wanted if bkey in core.lost_leases]:
        yield from reclaim(core, bkey)  # if it fails, so will its add: loaded on its own
    markers = {bkey: new_lease(core.objects) for bkey in wanted}
    try:
        leased = yield Call("add_many", (markers, policy.lease_ttl))
    except CacheError as exc:
        lost(core, markers if isinstance(exc, BackendTimeout) else {}, exc)
        leased = set()
    mine = {bkey: wanted[bkey] for bkey in wanted if bkey in leased}
    results: dict[str, Any] = {}
    if mine:
        batch_tags = None if tags_of is None else functools.partial(_batch_tags, tags_of, mine)
        try:
            with holding(core, mine):
                batch = yield from fills.timed_load(
                    core, functools.partial(load_many, list(mine.values())), batch_tags
                )
            results = {bkey: batch.value.get(id_) for bkey, id_ in mine.items()}
            leased_fills = {
                bkey: (markers[bkey], _one(batch, results[bkey], tags_of, id_))
                for bkey, id_ in mine.items()
            }
        except GeneratorExit:  # being closed: no more round trips
            remember(core, {bkey: markers[bkey] for bkey in mine})
            raise
        except BaseException:
            for bkey in mine:
                yield from release(core, bkey, markers[bkey])
            raise
        yield from _fill_many(core, leased_fills, policy)
    for bkey, id_ in wanted.items():
        if bkey not in leased:
            one_tags = None if tags_of is None else functools.partial(tags_of, id_)
            load = functools.partial(load_one, id_)
            results[bkey] = yield from load_and_fill(core, bkey, load, policy, one_tags)
    return results


def _batch_tags(
    tags_of: Callable[[K, Any], Iterable[str]], ids: Mapping[str, K], loaded: Mapping[K, Any]
) -> list[str]:
    """Every tag of a batch, so that one read fetches all their tokens."""
    return [tag for id_ in ids.values() for tag in tags_of(id_, loaded.get(id_))]


def _one(
    batch: Loaded, value: Any, tags_of: Callable[[K, Any], Iterable[str]] | None, id_: K
) -> Loaded:
    """One entry of a batch load, with the tokens of its own tags."""
    if tags_of is None or batch.tags is None:
        return Loaded(value, batch.delta, None, batch.rejected)
    tokens = {tag: batch.tags[tag] for tag in tags_of(id_, value)}
    return Loaded(value, batch.delta, tokens)


def _fill_many(
    core: CacheCore, leased: Mapping[str, tuple[Any, Loaded]], policy: FillPolicy
) -> Flow[None]:
    """Store leased values ``{bkey: (marker, loaded)}``, one batch per physical TTL."""
    try:
        groups, unstored = _pack_many(core, leased, policy)
    except BaseException:
        for bkey, (marker, _) in leased.items():
            yield from release(core, bkey, marker)
        raise
    for bkey in unstored:
        yield from release(core, bkey, leased[bkey][0])
    for seconds, items in groups.items():
        try:
            stored = yield Call("compare_and_set_many", (items, seconds))
        except CacheError as exc:
            lost(core, {bkey: marker for bkey, (marker, _) in items.items()}, exc)
            continue
        except BaseException:
            remember(core, {bkey: marker for bkey, (marker, _) in items.items()})
            raise
        core.counters.fills_rejected += len(items) - len(stored)


def _pack_many(
    core: CacheCore, leased: Mapping[str, tuple[Any, Loaded]], policy: FillPolicy
) -> tuple[dict[float | None, dict[str, tuple[Any, Any]]], list[str]]:
    """Encode leased values, grouped by physical TTL; and the keys of those that must
    not be stored (their leases are to be released)."""
    groups: dict[float | None, dict[str, tuple[Any, Any]]] = {}
    unstored = []
    for bkey, (marker, loaded) in leased.items():
        try:
            packed = fills.pack_fill(core, bkey, loaded, policy)
        except UNSTORABLE as exc:
            core.write_failed(exc)
            packed = None
        if packed is None:
            unstored.append(bkey)
        else:
            data, seconds = packed
            groups.setdefault(seconds, {})[bkey] = (marker, data)
    return groups, unstored
