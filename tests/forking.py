"""Running test code in real forked children: results back through a pipe, never a hang.

Each child runs one function, sends ``("ok", result)`` or ``("error", traceback)`` as
JSON through a pipe and leaves with ``os._exit``, so it never returns into pytest. The
parent waits for every child up to a generous deadline; a child that has not answered
by then (deadlocked, say) is killed by its PID and reported as ``("hung", ...)``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEADLINE = 60.0  # seconds for every child to answer: generous, a loaded CI machine


@dataclass(frozen=True)
class Child:
    pid: int
    reader: int


def fork(work: Callable[[], Any]) -> Child:
    """Start a child running ``work()``; the parent goes on at once."""
    reader, writer = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process that has threads; these tests
        # fork such processes on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(reader)
            try:
                outcome: list[Any] = ["ok", work()]
            except BaseException:
                outcome = ["error", traceback.format_exc()]
            with os.fdopen(writer, "w") as out:
                json.dump(outcome, out, default=repr)
        finally:
            os._exit(0)
    os.close(writer)
    return Child(pid, reader)


def outcome(child: Child, deadline: float) -> tuple[str, Any]:
    """The child's ``(status, result)``; it is reaped, or killed if past ``deadline``."""
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select(
                [child.reader], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
                return "hung", f"child {child.pid} did not answer in time"
            chunk = os.read(child.reader, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(child.reader)
    os.waitpid(child.pid, 0)
    if not chunks:
        return "error", f"child {child.pid} exited without a result"
    status, result = json.loads(b"".join(chunks))
    return status, result


def in_children(
    work: Callable[[int], Any],
    count: int,
    *,
    meanwhile: Callable[[], Any] | None = None,
    deadline: float = DEADLINE,
) -> tuple[Any, list[tuple[str, Any]]]:
    """Fork ``count`` children running ``work(i)``; run ``meanwhile()`` in the parent
    while they do; return its result and every child's ``(status, result)``, waiting
    at most ``deadline`` seconds for the children."""
    children = [fork(lambda i=i: work(i)) for i in range(count)]
    until = time.monotonic() + deadline
    try:
        mine = meanwhile() if meanwhile is not None else None
    finally:
        outcomes = [outcome(child, until) for child in children]
    return mine, outcomes
