"""``cachekit bench``: what a cache buys on a database, measured on a replayed workload.

One job per module: :mod:`~cachekit.bench.config` validates the settings,
:mod:`~cachekit.bench.workload` draws the trace, :mod:`~cachekit.bench.optimal` computes
the hit ratios no policy can beat, :mod:`~cachekit.bench.database` owns the bench's
tables, :mod:`~cachekit.bench.caches` builds the cache under test,
:mod:`~cachekit.bench.runner` replays the trace while
:mod:`~cachekit.bench.progress` shows how far it got, :mod:`~cachekit.bench.report`
shows the results and :mod:`~cachekit.bench.plot` draws them. :mod:`cachekit.cli` ties them
together.
"""
