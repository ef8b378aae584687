"""Fresh locks and connections in a child process after ``os.fork()``.

A child starts with a copy of its parent's memory, taken while only the forking thread
ran. A lock another thread held at that instant stays held in the child, where no
thread will ever release it; a socket object still refers to the parent's connection,
so parent and child would interleave commands on it and read each other's replies.
Objects owning such state register a reset here; in the child, before ``fork()``
returns, each reset runs: locks are replaced, and inherited connections are forgotten
by closing the child's copy of their file descriptors, which leaves the parent's
connection open and sends nothing on it (no ``QUIT``, no ``shutdown()``).

This runs for ``os.fork()`` and everything built on it (``multiprocessing``'s "fork"
start method, gunicorn, Celery's prefork pool, uWSGI, which calls
``PyOS_AfterFork_Child``). Objects are held weakly: registering never keeps one alive.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renew_locks_in_child", "reset_in_child"]

logger = logging.getLogger("cachekit")

T = TypeVar("T")

# Each registered object's resets, called with the object (a reset must not close over
# it, or the registry would keep it alive).
_resets: weakref.WeakKeyDictionary[Any, list[Callable[[Any], None]]] = weakref.WeakKeyDictionary()


def reset_in_child(obj: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(obj)`` in every child process forked while ``obj`` is alive."""
    # setdefault and append are single dict/list operations: atomic under the GIL.
    _resets.setdefault(obj, []).append(reset)


def renew_locks_in_child(obj: object, *names: str) -> None:
    """Give ``obj`` a new ``threading.Lock`` under each attribute name in a child.

    The state a lock guards is as the forking instant left it: every single dict or
    list operation is complete (the GIL), but a multi-step update another thread was
    making may be half done, so a lock guarding one must have a reset of its own.
    """
    for name in names:
        reset_in_child(obj, _lock_renewer(name))


def _lock_renewer(name: str) -> Callable[[Any], None]:
    def renew(obj: Any) -> None:
        setattr(obj, name, threading.Lock())

    return renew


def _after_fork_in_child() -> None:
    for obj, resets in list(_resets.items()):
        for reset in resets:
            try:
                reset(obj)
            except Exception:  # one failed reset must not leave the others undone
                logger.warning("cachekit: resetting %r after fork failed", obj, exc_info=True)


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
