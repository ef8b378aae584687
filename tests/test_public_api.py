"""The public surface is explicit: sorted ``__all__`` lists that match what is importable."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

import cachekit

MODULES = [
    "cachekit",
    "cachekit.backends",
    "cachekit.backends.base",
    "cachekit.backends.memory",
    "cachekit.backends.eviction",
    "cachekit.backends.redis",
    "cachekit.backends.redis_async",
    "cachekit.backends.memcached",
    "cachekit.backends.counting",
    "cachekit.exceptions",
    "cachekit.keys",
    "cachekit.keycodec",
    "cachekit.serializers",
    "cachekit.stats",
    "cachekit.views",
    "cachekit.decorators",
]


def _isort_style(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported, key=_isort_style)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_top_level_names() -> None:
    # Submodules become package attributes once imported; they are not re-exports.
    public = {
        name
        for name in dir(cachekit)
        if not name.startswith("_") and not isinstance(getattr(cachekit, name), ModuleType)
    }
    assert public == set(cachekit.__all__)


def test_every_exception_is_a_cache_error() -> None:
    for name in cachekit.exceptions.__all__:
        assert issubclass(getattr(cachekit.exceptions, name), cachekit.CacheError)
