"""Every Python snippet in README.md runs, in order, as a user would paste them."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_readme_has_snippets() -> None:
    assert len(snippets()) >= 6


@pytest.mark.redis
@pytest.mark.memcached
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_readme_snippets_run(redis_server: str, memcached_server: tuple[str, int]) -> None:
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, code in enumerate(snippets(), start=1):
        try:
            exec(compile(code, f"README.md snippet {number}", "exec", dont_inherit=True), namespace)  # noqa: S102
        except Exception as exc:
            pytest.fail(f"README.md snippet {number} failed: {exc!r}\n{code}")
    # The snippets, like a user's script, leave clients open; collect them here, where
    # the ResourceWarnings they raise are expected, not in whichever test runs next.
    namespace.clear()
    gc.collect()
