"""Read-through: a keyed view loads its own misses, a page at a time, with one SELECT ... IN.

Run: python examples/read_through.py [--redis URL | --memcached HOST:PORT]
"""

from __future__ import annotations

from _common import PRODUCTS, Catalog, Product, expect, open_cache, parse_args, report


def main() -> None:
    args = parse_args(__doc__)
    db = Catalog()

    def load_products(ids: list[int]) -> dict[int, Product]:
        """All the missing products in one query; ids that do not exist are left out."""
        marks = ",".join("?" * len(ids))  # placeholders only: the ids travel as parameters
        rows = db.query(f"SELECT * FROM products WHERE id IN ({marks})", ids)  # noqa: S608
        return {row["id"]: row for row in rows}

    with open_cache(args, "read-through") as cache:
        products = cache.read_through("product", load=db.find, load_many=load_products)

        # A listing page of 50 products: one cache read, then one SELECT for the misses.
        first = products.get_many(range(1, 51))
        expect(len(first) == 50 and db.reads == 1, "a cold page costs one SELECT")
        expect(all(first[i] == db.row(i) for i in first), "the page matches the table")

        # The same page again, then a page overlapping it by half.
        expect(products.get_many(range(1, 51)) == first, "a warm page is identical")
        overlap = products.get_many(range(26, 76))
        expect(len(overlap) == 50 and db.reads == 2, "only the 25 new ids reach SQL")

        # The last page runs past the end: absent ids are left out and cached as None.
        last = products.get_many(range(PRODUCTS - 9, PRODUCTS + 11))
        expect(sorted(last) == list(range(PRODUCTS - 9, PRODUCTS + 1)), "absent ids omitted")
        products.get_many(range(PRODUCTS - 9, PRODUCTS + 11))
        expect(products.get(PRODUCTS + 5) is None and db.reads == 3, "absence is cached")

        # A product page reads one id; an UPDATE is followed by invalidate().
        expect(products.get(7) == db.row(7) and db.reads == 3, "a single get hits")
        db.execute("UPDATE products SET stock = stock - 1 WHERE id = ?", (7,))
        products.invalidate(7)
        expect(products.get(7) == db.row(7) and db.reads == 4, "reloaded after invalidate")

        lookups = 50 * 3 + 20 * 2 + 1 + 2
        report("read-through", cache, db, lookups=lookups)
        expect(lookups - db.reads > 0, "the cache saved queries")
        products.invalidate_many(range(1, PRODUCTS + 11))


if __name__ == "__main__":
    main()
