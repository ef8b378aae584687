"""FastAPI recipe: an AsyncCache and an AsyncCachedRepository built in the lifespan, handed to
endpoints through ``Depends``, and closed on shutdown.

Serve it (from examples/; memory cache unless CACHEKIT_REDIS_URL is set):
    CACHEKIT_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn fastapi_app:app
Or run it once through FastAPI's TestClient: python examples/fastapi_app.py
tests/test_recipes.py drives it the same way, on memory and on Redis.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import String, func, make_url, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from cachekit import AsyncBackend, AsyncCache, Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.sqlalchemy import AsyncCachedRepository

PRODUCTS = 50  # rows the demo database starts with, ids 1..50


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    price_cents: Mapped[int]


class ProductIn(BaseModel):
    """The body of PUT /products/{id}."""

    name: str = Field(min_length=1, max_length=60)
    price_cents: int = Field(ge=0)


Summary = Callable[[], Awaitable[dict[str, int]]]


@dataclass(frozen=True)
class Shop:
    """What the lifespan builds once and the endpoints share."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    cache: AsyncCache
    products: AsyncCachedRepository[Product]
    summary: Summary  # an @cache.cached function


def as_json(product: Product) -> dict[str, Any]:
    return {"id": product.id, "name": product.name, "price_cents": product.price_cents}


def make_backend(redis_url: str | None) -> AsyncBackend | Backend:
    """Redis when a URL is given (the driver imported only then), else process memory."""
    if redis_url is None:
        return MemoryBackend(maxsize=10_000)
    from cachekit.backends.redis import AsyncRedisBackend  # noqa: PLC0415 - optional driver

    # 1 s rather than the 0.1 s default: a read that timed out is a miss and a reload.
    return AsyncRedisBackend.from_url(redis_url, timeout=1.0)


async def open_database(url: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """The engine, its session factory, and the demo rows. In-memory SQLite needs one
    shared connection (StaticPool): each new connection would be a new, empty database."""
    parsed = make_url(url)
    in_memory = parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")
    engine = create_async_engine(url, **({"poolclass": StaticPool} if in_memory else {}))
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    # expire_on_commit=False: an endpoint returns the entity it just committed without
    # a lazy reload, which AsyncSession cannot do implicitly.
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions.begin() as session:
        if await session.get(Product, 1) is None:
            session.add_all(
                Product(id=i, name=f"Product {i}", price_cents=100 * i)
                for i in range(1, PRODUCTS + 1)
            )
    return engine, sessions


def catalog_summary(
    cache: AsyncCache,
    products: AsyncCachedRepository[Product],
    sessions: async_sessionmaker[AsyncSession],
) -> Summary:
    """An aggregate cached with ``@cache.cached``. Tagged with the repository's table tag,
    so any product write the repository sees drops it after its commit."""

    @cache.cached(key="catalog:summary", tags=[products.table_tag])
    async def summary() -> dict[str, int]:
        async with sessions() as session:
            count, total = (
                await session.execute(select(func.count(), func.sum(Product.price_cents)))
            ).one()
        return {"products": count, "total_price_cents": total or 0}

    return summary


def create_app(
    *,
    redis_url: str | None = None,
    database_url: str = "sqlite+aiosqlite://",
    namespace: str = "shop",
) -> FastAPI:
    """The app; its cache, repository and engine live from startup to shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine, sessions = await open_database(database_url)
        backend = make_backend(redis_url)
        cache = AsyncCache(backend, namespace=namespace, ttl=300)
        # Tracks every session `sessions` makes: their commits invalidate the rows written.
        products = AsyncCachedRepository(cache, Product, session_factory=sessions, ttl=300)
        summary = catalog_summary(cache, products, sessions)
        app.state.shop = Shop(engine, sessions, cache, products, summary)
        try:
            yield
        finally:
            del app.state.shop
            await products.aclose()  # stop listening; wait for invalidations in flight
            await cache.aclose()  # replay any journaled invalidation
            if isinstance(backend, AsyncBackend):
                await backend.aclose()  # the cache leaves its backend open: it is ours
            await engine.dispose()

    app = FastAPI(title="cachekit FastAPI recipe", lifespan=lifespan)
    app.include_router(router)
    return app


# -- dependencies --------------------------------------------------------------------------


def get_shop(request: Request) -> Shop:
    return cast(Shop, request.app.state.shop)


def get_cache(shop: Annotated[Shop, Depends(get_shop)]) -> AsyncCache:
    return shop.cache


def get_products(shop: Annotated[Shop, Depends(get_shop)]) -> AsyncCachedRepository[Product]:
    return shop.products


def get_summary(shop: Annotated[Shop, Depends(get_shop)]) -> Summary:
    return shop.summary


async def get_session(shop: Annotated[Shop, Depends(get_shop)]) -> AsyncIterator[AsyncSession]:
    async with shop.sessions() as session:
        yield session


CacheDep = Annotated[AsyncCache, Depends(get_cache)]
ProductsDep = Annotated[AsyncCachedRepository[Product], Depends(get_products)]
SummaryDep = Annotated[Summary, Depends(get_summary)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]

# -- endpoints -----------------------------------------------------------------------------

router = APIRouter()


@router.get("/products/{product_id}")
async def read_product(product_id: int, products: ProductsDep) -> dict[str, Any]:
    product = await products.get(product_id)  # a hit: no SELECT
    if product is None:
        raise HTTPException(status_code=404, detail="no such product")
    return as_json(product)


@router.put("/products/{product_id}")
async def update_product(
    product_id: int, body: ProductIn, session: SessionDep, products: ProductsDep
) -> dict[str, Any]:
    async with session.begin():
        # Read what is written from the database, not from the cache.
        product = await session.get(Product, product_id)
        if product is None:
            raise HTTPException(status_code=404, detail="no such product")  # rolls back
        product.name, product.price_cents = body.name, body.price_cents
        await products.update(product, session=session)
    # Committed: the repository invalidated (and reloaded) the row before commit returned.
    return as_json(product)


@router.get("/catalog/summary")
async def read_summary(summary: SummaryDep) -> dict[str, int]:
    return await summary()


@router.get("/stats")
async def read_stats(cache: CacheDep) -> dict[str, Any]:
    return dataclasses.asdict(cache.stats())


app = create_app(redis_url=os.environ.get("CACHEKIT_REDIS_URL"))


def main() -> None:
    """One pass through the endpoints with TestClient, which runs the lifespan."""
    from fastapi.testclient import TestClient  # noqa: PLC0415 - needs httpx2, a dev tool

    demo = create_app(
        redis_url=os.environ.get("CACHEKIT_REDIS_URL"),
        namespace=f"example-fastapi-{uuid.uuid4().hex[:8]}",
    )
    with TestClient(demo) as client:
        for _ in range(3):
            print("GET /products/7 ->", client.get("/products/7").json())
        print(
            "PUT /products/7 ->",
            client.put("/products/7", json={"name": "Ada", "price_cents": 42}).json(),
        )
        print("GET /products/7 ->", client.get("/products/7").json())
        print("GET /catalog/summary ->", client.get("/catalog/summary").json())
        print("GET /stats ->", client.get("/stats").json())


if __name__ == "__main__":
    main()
