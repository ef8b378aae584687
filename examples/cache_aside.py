"""Cache-aside: the application asks the cache first and fills it from SQLite on a miss.

Run: python examples/cache_aside.py [--redis URL | --memcached HOST:PORT]
"""

from __future__ import annotations

import random

from _common import PRODUCTS, Catalog, Product, expect, open_cache, parse_args, report

from cachekit import MISSING


def main() -> None:
    args = parse_args(__doc__)
    db = Catalog()
    with open_cache(args, "cache-aside") as cache:

        @cache.cached(key="product:{product_id}")
        def get_product(product_id: int) -> Product | None:
            return db.find(product_id)

        # A skewed workload: most page views go to a few popular products.
        rng = random.Random(42)
        views = [min(int(rng.paretovariate(1.2)), PRODUCTS) for _ in range(2_000)]
        for product_id in views:
            expect(get_product(product_id) == db.row(product_id), f"product {product_id}")
        expect(db.reads == len(set(views)), "one SELECT per distinct product")

        # get_or_load caches what is not a function call, such as a report query.
        def count_low_stock() -> int:
            return db.query("SELECT count(*) AS n FROM products WHERE stock < 5")[0]["n"]

        low_stock = cache.get_or_load("report:low-stock", count_low_stock, ttl=30)
        again = cache.get_or_load("report:low-stock", count_low_stock, ttl=30)
        expect(again == low_stock and db.reads == len(set(views)) + 1, "the report is cached")
        lookups = len(views) + 2

        # After an UPDATE the cached row is stale until the application invalidates it.
        db.execute("UPDATE products SET price_cents = price_cents + 500 WHERE id = ?", (1,))
        expect(get_product(1) != db.row(1), "without invalidation the old price is served")
        get_product.invalidate(1)
        expect(get_product(1) == db.row(1), "after invalidation the new price is served")
        lookups += 2

        report("cache-aside", cache, db, lookups=lookups)
        expect(lookups - db.reads > 0, "the cache saved queries")
        expect(cache.stats().loads == db.reads, "every miss loaded once")
        cache.delete_many([get_product.key(i) for i in set(views)] + ["report:low-stock"])
        expect(cache.get(get_product.key(1)) is MISSING, "cleaned up")


if __name__ == "__main__":
    main()
