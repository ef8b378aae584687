"""How far a bench run got: a rich progress bar on a terminal, one line per phase else."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["phases"]


@contextmanager
def phases() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield ``start(description, total)``, which returns ``update(done)``.

    A rich progress bar on a terminal; one line per phase on stderr otherwise, so logs
    still show where a long run is.
    """
    try:
        from rich.console import Console  # noqa: PLC0415 - optional (the bench extra)
        from rich.progress import Progress  # noqa: PLC0415
    except ImportError:
        console = None
    else:
        console = Console(stderr=True)
    if console is None or not console.is_terminal:
        yield _log_phase
        return
    with Progress(console=console, transient=True) as bar:

        def start(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda done: bar.update(task, completed=done)

        yield start


def _log_phase(description: str, total: int) -> Callable[[int], None]:
    print(f"==> {description} ({total:,})", file=sys.stderr, flush=True)
    return lambda done: None
