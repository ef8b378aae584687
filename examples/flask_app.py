"""Flask recipe: a Cache and a CachedRepository built in an app factory, shared by the views
through ``app.extensions``, and closed by ``close_shop`` when the process stops.

Serve it (from examples/; Flask finds the factory; a memory cache unless given Redis):
    flask --app flask_app run
    flask --app "flask_app:create_app(redis_url='redis://127.0.0.1:6379/0')" run
Or run it once through Flask's test client (Redis if CACHEKIT_REDIS_URL is set):
    python examples/flask_app.py
tests/test_recipes.py drives it the same way.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from flask import Blueprint, Flask, abort, current_app, request
from sqlalchemy import Engine, String, create_engine, func, make_url, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from cachekit import Backend, Cache
from cachekit.backends.memory import MemoryBackend
from cachekit.sqlalchemy import CachedRepository

PRODUCTS = 50  # rows the demo database starts with, ids 1..50


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    price_cents: Mapped[int]


Summary = Callable[[], dict[str, int]]


@dataclass(frozen=True)
class Shop:
    """What the factory builds once and the views share."""

    engine: Engine
    sessions: sessionmaker[Session]
    backend: Backend
    cache: Cache
    products: CachedRepository[Product]
    summary: Summary  # a @cache.cached function


def as_json(product: Product) -> dict[str, Any]:
    return {"id": product.id, "name": product.name, "price_cents": product.price_cents}


def make_backend(redis_url: str | None) -> Backend:
    """Redis when a URL is given (the driver imported only then), else process memory."""
    if redis_url is None:
        return MemoryBackend(maxsize=10_000)
    from cachekit.backends.redis import RedisBackend  # noqa: PLC0415 - optional driver

    # 1 s rather than the 0.1 s default: a read that timed out is a miss and a reload.
    return RedisBackend.from_url(redis_url, timeout=1.0)


def open_database(url: str) -> tuple[Engine, sessionmaker[Session]]:
    """The engine, its session factory, and the demo rows. In-memory SQLite needs one
    shared connection (StaticPool), usable from the server's worker threads."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)
    Base.metadata.create_all(engine)
    # expire_on_commit=False: a view returns the entity it just committed as it is.
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions.begin() as session:
        if session.get(Product, 1) is None:
            session.add_all(
                Product(id=i, name=f"Product {i}", price_cents=100 * i)
                for i in range(1, PRODUCTS + 1)
            )
    return engine, sessions


def catalog_summary(
    cache: Cache, products: CachedRepository[Product], sessions: sessionmaker[Session]
) -> Summary:
    """An aggregate cached with ``@cache.cached``. Tagged with the repository's table tag,
    so any product write the repository sees drops it after its commit."""

    @cache.cached(key="catalog:summary", tags=[products.table_tag])
    def summary() -> dict[str, int]:
        with sessions() as session:
            count, total = session.execute(
                select(func.count(), func.sum(Product.price_cents))
            ).one()
        return {"products": count, "total_price_cents": total or 0}

    return summary


def create_app(
    *,
    redis_url: str | None = None,
    database_url: str = "sqlite://",
    namespace: str = "shop",
) -> Flask:
    """The app factory: one cache, repository and engine per app."""
    app = Flask(__name__)
    engine, sessions = open_database(database_url)
    backend = make_backend(redis_url)
    cache = Cache(backend, namespace=namespace, ttl=300)
    # Tracks every session `sessions` makes: their commits invalidate the rows written.
    products = CachedRepository(cache, Product, session_factory=sessions, ttl=300)
    summary = catalog_summary(cache, products, sessions)
    app.extensions["shop"] = Shop(engine, sessions, backend, cache, products, summary)
    app.register_blueprint(views)
    return app


def close_shop(app: Flask) -> None:
    """Release what ``create_app`` opened. WSGI has no shutdown event: call this from
    your server's worker-exit hook (gunicorn's ``worker_exit``) or ``atexit``."""
    shop = cast(Shop, app.extensions.pop("shop"))
    shop.products.close()  # stop listening to sessions
    shop.cache.replay_invalidations()  # any journaled invalidation, while we still can
    shop.backend.close()
    shop.engine.dispose()


def get_shop() -> Shop:
    return cast(Shop, current_app.extensions["shop"])


# -- views ---------------------------------------------------------------------------------

views = Blueprint("shop", __name__)


@views.get("/products/<int:product_id>")
def read_product(product_id: int) -> dict[str, Any]:
    product = get_shop().products.get(product_id)  # a hit: no SELECT
    if product is None:
        abort(404, "no such product")
    return as_json(product)


@views.put("/products/<int:product_id>")
def update_product(product_id: int) -> dict[str, Any]:
    body = request.get_json(silent=True) or {}
    name, price_cents = body.get("name"), body.get("price_cents")
    if not isinstance(name, str) or not 0 < len(name) <= 60:
        abort(422, "name: 1 to 60 characters")
    if type(price_cents) is not int or price_cents < 0:
        abort(422, "price_cents: an integer >= 0")
    shop = get_shop()
    with shop.sessions.begin() as session:
        # Read what is written from the database, not from the cache.
        product = session.get(Product, product_id)
        if product is None:
            abort(404, "no such product")  # rolls back
        product.name, product.price_cents = name, price_cents
        shop.products.update(product, session=session)
    # Committed: the repository invalidated (and reloaded) the row as commit returned.
    return as_json(product)


@views.get("/catalog/summary")
def read_summary() -> dict[str, int]:
    return get_shop().summary()


@views.get("/stats")
def read_stats() -> dict[str, Any]:
    return dataclasses.asdict(get_shop().cache.stats())


def main() -> None:
    """One pass through the views with Flask's test client."""
    app = create_app(
        redis_url=os.environ.get("CACHEKIT_REDIS_URL"),
        namespace=f"example-flask-{uuid.uuid4().hex[:8]}",
    )
    client = app.test_client()
    for _ in range(3):
        print("GET /products/7 ->", client.get("/products/7").json)
    update = {"name": "Ada", "price_cents": 42}
    print("PUT /products/7 ->", client.put("/products/7", json=update).json)
    print("GET /products/7 ->", client.get("/products/7").json)
    print("GET /catalog/summary ->", client.get("/catalog/summary").json)
    print("GET /stats ->", client.get("/stats").json)
    close_shop(app)


if __name__ == "__main__":
    main()
