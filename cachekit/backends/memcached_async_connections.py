"""Connections to one memcached server for asyncio: at most ``size``, none left out of step.

A connection carries one command at a time. Either the command completes (every reply
it expected read, nothing more received) and the connection goes back to the pool, or
it does not (cancelled, timed out, refused, answered with an error) and the connection
is closed at once: the reply it was owed can never be read by the next caller. This is
the whole of the cancellation story; nothing else needs to know about it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, TypeVar

from cachekit.backends.memcached_protocol import Command, ProtocolError, Replies

__all__ = ["PoolTimeout", "ServerConnections"]

T = TypeVar("T")

#: ``(host, port)`` for TCP, or a unix socket's path (pymemcache's server spec).
ServerSpec = tuple[str, int] | str

_READ_SIZE: Final = 256 * 1024


class PoolTimeout(TimeoutError):
    """No connection to the server came free within the timeout: the pool is busy (the
    server is not at fault, so this does not count against it)."""


class _Connection:
    """One open connection and the reply parser reading it."""

    __slots__ = ("generation", "reader", "replies", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.replies = Replies()
        self.generation = generation

    async def call(self, command: Command[T]) -> T:
        """Send the request and read every reply it expects.

        Raises:
            ConnectionResetError: the server closed the connection.
            ServerReplyError, ProtocolError: see :class:`Replies`.
        """
        self.writer.write(command.request)
        await self.writer.drain()
        replies = self.replies
        received = []
        for kind in command.expects:
            reply = replies.next(kind)
            while reply is None:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionResetError("memcached closed the connection")
                replies.feed(data)
                reply = replies.next(kind)
            received.append(reply)
        if replies.pending:
            raise ProtocolError(f"{replies.pending} bytes more than the replies expected")
        return command.result(received)

    def abort(self) -> None:
        """Close without sending what is still buffered (the server may be hung)."""
        self.writer.transport.abort()


class ServerConnections:
    """At most ``size`` connections to one server, each lent to one caller at a time.

    A caller waits for a free connection (or for room to open one) at most ``timeout``
    seconds, and that wait counts against the ``timeout`` its command has; opening a
    connection has ``connect_timeout`` seconds of its own. A pool belongs to one event
    loop at a time: it moves to another only once it holds no connection (after
    :meth:`aclose`).

    Attributes:
        connections: connections open, opening, or closing: never more than ``size``.
        peak: the most there ever were at once.
        opened: connections opened (or attempted) in all.
    """

    def __init__(
        self, server: ServerSpec, *, size: int, timeout: float, connect_timeout: float
    ) -> None:
        self.server = server
        self.connections = 0
        self.peak = 0
        self.opened = 0
        self._size = size
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Connection] = []
        # Connections opened before the last aclose() are closed when they come back.
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, command: Command[T]) -> T:
        """Run one command on a connection of the pool.

        Raises:
            PoolTimeout: no connection came free in time.
            TimeoutError: the server did not answer (or accept) in time.
            OSError: the connection was refused or lost.
            ServerReplyError, ProtocolError: see :class:`Replies`.
        """
        loop = self._bound_loop()
        deadline = loop.time() + self._timeout
        if self._slots.locked():
            await self._wait_for_slot(deadline)
        else:
            await self._slots.acquire()  # free: returns at once, no timer needed
        connection: _Connection | None = None
        opening = False
        try:
            connection = await self._take_idle()
            if connection is None:
                opening = True
                started = loop.time()
                connection = await self._connect()
                deadline += loop.time() - started  # connecting has a budget of its own
            async with asyncio.timeout_at(deadline):
                result = await connection.call(command)
        except BaseException as exc:
            # Cancelled, timed out, or failed: whatever reply is still owed on this
            # connection must never reach another caller.
            self._discard(connection, counted=opening or connection is not None)
            if isinstance(exc, ConnectionError):
                # The server closed it, so most likely the idle ones too (a restart):
                # close them rather than fail one more call on each.
                self._drop(self._idle)
                self._idle = []
            raise
        if connection.generation != self._generation:
            self._discard(connection, counted=True)
        else:
            self._idle.append(connection)
            self._slots.release()
        return result

    async def _wait_for_slot(self, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout(
                f"no connection to memcached {self.server} came free within "
                f"{self._timeout} s ({self._size} in use)"
            ) from None

    async def _take_idle(self) -> _Connection | None:
        """An idle connection the server has not closed meanwhile, or None."""
        stale = []
        while self._idle:
            connection = self._idle.pop()
            if not connection.writer.transport.is_closing():
                break
            stale.append(connection)  # its EOF arrived while it was idle
        else:
            connection = None
        if stale:
            self._drop(stale)
            if connection is None:
                await asyncio.sleep(0)  # let their sockets close before opening one
        return connection

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self.connections:
                raise RuntimeError(
                    "this memcached backend has connections in another event loop; "
                    "aclose() it there first, or build one per loop"
                )
            self._loop = loop
            self._slots = asyncio.Semaphore(self._size)
        return loop

    async def _connect(self) -> _Connection:
        # Counted from the first attempt: a socket exists from then on.
        self.connections += 1
        self.opened += 1
        self.peak = max(self.peak, self.connections)
        async with asyncio.timeout(self._connect_timeout):
            if isinstance(self.server, str):
                reader, writer = await asyncio.open_unix_connection(self.server)
            else:
                reader, writer = await asyncio.open_connection(*self.server)
        return _Connection(reader, writer, self._generation)

    def _discard(self, connection: _Connection | None, *, counted: bool) -> None:
        """Close the connection (or a failed attempt's leftovers) and give its slot back;
        ``counted``: it was counted in :attr:`connections` (opened, or attempted).

        The slot is given back by a callback scheduled after the abort's: the event loop
        runs callbacks in the order they were scheduled, and the transport closes its
        socket in its own, so the socket is gone before anyone can open another one.
        """
        if connection is not None:
            connection.abort()
        asyncio.get_running_loop().call_soon(self._closed, counted)

    def _closed(self, counted: bool) -> None:
        self.connections -= counted
        self._slots.release()

    def _drop(self, idle: list[_Connection]) -> None:
        """Close idle connections (which hold no slot); counted once their sockets are."""
        for connection in idle:
            connection.abort()
        if idle:
            asyncio.get_running_loop().call_soon(self._forget, len(idle))

    def _forget(self, count: int) -> None:
        self.connections -= count

    async def aclose(self) -> None:
        """Close the idle connections now, and those in use as their calls end."""
        self._generation += 1
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.writer.close()
        try:
            for connection in idle:
                with contextlib.suppress(OSError):  # it was broken anyway
                    await connection.writer.wait_closed()
        finally:
            self.connections -= len(idle)
