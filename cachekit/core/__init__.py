"""The I/O-free core shared by ``Cache`` and ``AsyncCache``.

Every decision (leases, fills, freshness, tags, the journal's replays) is a *flow*: a
generator that yields what it needs done (:mod:`cachekit.core.ops`: a backend call, a
sleep, a loader call) and receives the result. The facades drive the same flows, one
with blocking calls, one with ``await``; nothing here performs I/O or imports them.
"""
