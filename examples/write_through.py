"""Write-through: every write goes to SQLite first and then to the cache, never the reverse.

After each save the view drops the entry and reloads it from the table under a lease,
so two writers racing can never leave the older row cached (see cachekit.views).

Run: python examples/write_through.py [--redis URL | --memcached HOST:PORT]
"""

from __future__ import annotations

import sqlite3

from _common import Catalog, Product, expect, open_cache, parse_args, report


def main() -> None:
    args = parse_args(__doc__)
    db = Catalog()

    def save_product(product_id: int, product: Product) -> None:
        db.execute(
            "INSERT INTO products (id, name, price_cents, stock) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
            " price_cents = excluded.price_cents, stock = excluded.stock",
            (product_id, product["name"], product["price_cents"], product["stock"]),
        )

    def remove_product(product_id: int) -> None:
        db.execute("DELETE FROM products WHERE id = ?", (product_id,))

    with open_cache(args, "write-through") as cache:
        products = cache.write_through(
            "product", load=db.find, save=save_product, remove=remove_product
        )

        # A price change: read (one SELECT), write the row, and the cache holds the new row.
        product = products.get(42)
        products.put(42, {**product, "price_cents": product["price_cents"] + 250})
        expect(products.get(42) == db.row(42), "the cache holds the row just written")

        # A new product is cached on write (the reload after the save is its one SELECT).
        new = {"id": 1001, "name": "Gift card", "price_cents": 5_000, "stock": 99}
        products.put(1001, new)
        expect(products.get(1001) == new == db.row(1001), "a new row is cached on write")

        # A write the database refuses (CHECK price_cents >= 0) leaves the cache as it was.
        try:
            products.put(1001, {**new, "price_cents": -1})
            refused = False
        except sqlite3.IntegrityError:
            refused = True
        expect(refused, "the table refuses a negative price")
        expect(products.get(1001) == new == db.row(1001), "a failed save changes nothing")

        # Deleting goes to the table first; the next read finds nothing and caches that.
        products.delete(1001)
        expect(products.get(1001) is None and db.row(1001) is None, "deleted everywhere")
        expect(products.get(1001) is None, "absence is cached")

        lookups = 6
        expect(db.reads == 4, "SELECTs: the first read, one reload per put, after the delete")
        expect(db.writes == 4, "three writes, and the one the table refused")
        report("write-through", cache, db, lookups=lookups)
        products.invalidate_many([42, 1001])


if __name__ == "__main__":
    main()
