"""The framework recipes in examples/, driven through their test clients."""

from __future__ import annotations

import gc
import importlib.util
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
ROWS = 50  # each recipe's demo rows: ids 1..50, priced 100 * id cents
TOTAL = sum(100 * i for i in range(1, ROWS + 1))

# (method, path, JSON body or None) -> (status, JSON reply): one shape for both clients.
Http = Callable[[str, str, "dict[str, Any] | None"], "tuple[int, Any]"]


def load(name: str) -> ModuleType:
    """Import an example by path (examples/ is not a package), as its own module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Selects:
    """Counts the SELECTs an engine sends: the loads that reached the database."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.count += statement.lstrip().upper().startswith("SELECT")


def namespace() -> str:
    return f"test-recipe-{uuid.uuid4().hex[:8]}"


def check_reads_and_writes(http: Http, selects: Selects) -> None:
    """Loaded once, then served from the cache; a committed update is read next."""
    assert http("GET", "/products/7", None) == (
        200,
        {"id": 7, "name": "Product 7", "price_cents": 700},
    )
    assert selects.count == 1
    for _ in range(3):
        assert http("GET", "/products/7", None)[1]["name"] == "Product 7"
    assert selects.count == 1, "hits send no SELECT"
    _, stats = http("GET", "/stats", None)
    assert (stats["hits"], stats["misses"], stats["loads"]) == (3, 1, 1)

    for _ in range(2):  # the @cache.cached aggregate: one SELECT for both
        assert http("GET", "/catalog/summary", None) == (
            200,
            {"products": ROWS, "total_price_cents": TOTAL},
        )
    assert selects.count == 2

    update = {"name": "Ada", "price_cents": 42}
    assert http("PUT", "/products/7", update) == (200, {"id": 7, **update})
    after_commit = selects.count
    assert http("GET", "/products/7", None) == (200, {"id": 7, **update})
    # Write-through: the commit invalidated the entry and reloaded it before returning.
    assert selects.count == after_commit
    # The aggregate carries the repository's table tag: the commit dropped it too.
    total = TOTAL - 700 + 42
    assert http("GET", "/catalog/summary", None)[1]["total_price_cents"] == total


def check_refusals(http: Http) -> None:
    """A rejected or rolled-back write changes nothing, in the database or the cache."""
    assert http("PUT", "/products/8", {"name": "", "price_cents": 1})[0] == 422
    assert http("PUT", "/products/8", {"name": "x", "price_cents": -1})[0] == 422
    assert http("PUT", "/products/999", {"name": "x", "price_cents": 1})[0] == 404
    assert http("GET", "/products/999", None)[0] == 404
    assert http("GET", "/products/8", None)[1]["name"] == "Product 8"
    _, stats = http("GET", "/stats", None)
    assert stats["errors"] == 0 and stats["pending_invalidations"] == 0


# -- FastAPI ---------------------------------------------------------------------------------


@pytest.fixture
def no_resource_warnings() -> Iterator[None]:
    """Fail if what the test leaves behind (clients, pools, sockets) was left open."""
    gc.collect()  # earlier tests' garbage, outside the window
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks


def fastapi_http(client: TestClient) -> Http:
    def http(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        response = client.request(method, path, json=body)
        return response.status_code, response.json()

    return http


def run_fastapi(redis_url: str | None) -> None:
    recipe = load("fastapi_app")
    app = recipe.create_app(redis_url=redis_url, namespace=namespace())
    with TestClient(app) as client:  # runs the lifespan: startup here, shutdown on exit
        shop = app.state.shop
        check_reads_and_writes(fastapi_http(client), Selects(shop.engine.sync_engine))
        check_refusals(fastapi_http(client))
    assert not hasattr(app.state, "shop"), "the lifespan's shutdown ran"
    assert shop.cache.stats().pending_invalidations == 0


def test_fastapi_recipe_on_memory(no_resource_warnings: None) -> None:
    run_fastapi(None)


@pytest.mark.redis
def test_fastapi_recipe_on_redis(redis_server: str, no_resource_warnings: None) -> None:
    run_fastapi(redis_server)


# -- Flask ----------------------------------------------------------------------------------


def flask_http(client: Any) -> Http:
    def http(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        response = client.open(path, method=method, json=body)
        return response.status_code, response.json

    return http


def run_flask(redis_url: str | None) -> None:
    recipe = load("flask_app")
    app = recipe.create_app(redis_url=redis_url, namespace=namespace())
    shop = app.extensions["shop"]
    client = app.test_client()
    check_reads_and_writes(flask_http(client), Selects(shop.engine))
    check_refusals(flask_http(client))
    recipe.close_shop(app)
    assert "shop" not in app.extensions
    assert shop.cache.stats().pending_invalidations == 0


def test_flask_recipe_on_memory(no_resource_warnings: None) -> None:
    run_flask(None)


@pytest.mark.redis
def test_flask_recipe_on_redis(redis_server: str, no_resource_warnings: None) -> None:
    run_flask(redis_server)
