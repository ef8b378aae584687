"""Server processes for tests: started on free loopback ports, stopped by PID, always reaped.

Generic over the server: a command is a function from the port to an argv, so Redis,
a Redis Cluster node or memcached start the same way. Every process started here is
stopped by its own PID (never by name), by the :class:`Servers` group that started
it, and by an ``atexit`` safety net if a test run is interrupted before that.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import redis

HOST = "127.0.0.1"

#: Builds a server's argv for the port it is to listen on.
Command = Callable[[int], Sequence[str]]

_live: set[Server] = set()


class ServerError(RuntimeError):
    """A server did not start, or a cluster did not form, in time."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (the kernel's choice; it may be taken later)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def binary(name: str) -> str | None:
    """The path of an executable, on PATH or in /usr/bin and /usr/sbin."""
    for candidate in (shutil.which(name), f"/usr/bin/{name}", f"/usr/sbin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Server:
    """One server process on ``host:port``, logging to ``<workdir>/<name>.log``.

    It can be paused (SIGSTOP), resumed (SIGCONT), killed (SIGKILL) and started again
    on the same port with the same argv. Every signal goes to its own PID.
    """

    def __init__(self, name: str, argv: Sequence[str], port: int, workdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.host = HOST
        self.port = port
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def __repr__(self) -> str:
        return f"Server({self.name!r}, port={self.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *, timeout: float = 10.0) -> None:
        """Launch the process and wait until it accepts connections.

        Raises:
            ServerError: it exited, or did not listen within ``timeout`` seconds (the
                process is stopped and the message ends with its log).
        """
        if self.running():
            raise ServerError(f"{self} is already running")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.paused = False
        _live.add(self)
        deadline = time.monotonic() + timeout
        while not listening(self.host, self.port):
            if not self.running() or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.name} did not start on port {self.port}: {self.tail()}")
            time.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets (connects still succeed) but answers
        nothing. Returns once every thread of it is stopped: on a busy machine the signal
        takes effect a moment later, and a request sent meanwhile would still be served."""
        self._signal(signal.SIGSTOP)
        self.paused = True
        if self.pid is not None:
            _wait_until_stopped(self.pid)

    def resume(self) -> None:
        """SIGCONT: the process carries on, then reads whatever was sent meanwhile."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, and reap it: the port is free and the in-memory data is gone."""
        if self.process is not None and self.running():
            self.process.kill()
        self._reap(timeout=10.0)

    def restart(self, *, timeout: float = 10.0) -> None:
        """Stop the process if it runs, then start it again on the same port."""
        self.stop()
        self.start(timeout=timeout)

    def stop(self, *, timeout: float = 5.0) -> None:
        """SIGTERM (after SIGCONT, which a paused process needs to act on it), then
        SIGKILL if it is still there after ``timeout`` seconds. Idempotent."""
        if self.process is None:
            return
        if self.running():
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap(timeout=timeout)

    def tail(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _signal(self, signum: signal.Signals) -> None:
        if not self.running():
            raise ServerError(f"{self} is not running")
        assert self.process is not None
        self.process.send_signal(signum)

    def _reap(self, *, timeout: float) -> None:
        if self.process is not None:
            self.process.wait(timeout=timeout)
        self.paused = False
        _live.discard(self)


class Servers:
    """A group of servers that stops every member on exit, by PID, in reverse order.

    Use it as a context manager (or call :meth:`stop_all` in a ``finally``)::

        with Servers(tmp_path) as servers:
            server = servers.start("redis", redis_command(tmp_path))
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.members: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self, name: str, command: Command, *, attempts: int = 3, timeout: float = 10.0
    ) -> Server:
        """Start ``command(port)`` on a free port; try another port if one was taken
        between choosing it and binding it.

        Raises:
            ServerError: it did not start after ``attempts`` ports.
        """
        failure = ServerError(f"{name}: no attempt made")
        for _ in range(attempts):
            port = free_port()
            server = Server(name, command(port), port, self.workdir)
            self.members.append(server)
            try:
                server.start(timeout=timeout)
            except ServerError as exc:
                failure = exc
                continue
            return server
        raise failure

    def stop_all(self) -> None:
        """Stop every member; an error stopping one does not spare the others."""
        errors = []
        for server in reversed(self.members):
            try:
                server.stop()
            except Exception as exc:  # collected and re-raised below
                errors.append(exc)
        if errors:
            raise ServerError(f"could not stop every server: {errors!r}")


@atexit.register
def _stop_leftovers() -> None:
    """The safety net: an interrupted run must not leave servers behind."""
    for server in list(_live):
        try:
            server.stop(timeout=2.0)
        except Exception:  # noqa: S112 - best effort at interpreter exit
            continue


# -- Redis -------------------------------------------------------------------------------


def redis_command(workdir: Path, *extra: str, executable: str = "redis-server") -> Command:
    """A throwaway Redis: loopback only, no persistence, files in ``workdir``."""
    path = binary(executable) or executable

    def command(port: int) -> list[str]:
        return [
            path,
            "--port", str(port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            *extra,
        ]  # fmt: skip

    return command


def redis_cluster_node_command(workdir: Path) -> Command:
    """A Redis Cluster node. Its bus port is chosen free too (``--cluster-port``),
    since the default, port + 10000, may be over 65535 or taken."""

    def command(port: int) -> list[str]:
        return redis_command(
            workdir,
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            "--cluster-port", str(free_port()),
            "--cluster-node-timeout", "2000",
        )(port)  # fmt: skip

    return command


def start_redis_cluster(servers: Servers, nodes: int = 3, *, timeout: float = 30.0) -> list[Server]:
    """Start ``nodes`` primaries, join them with ``redis-cli --cluster create`` and wait
    until every node reports ``cluster_state:ok``. The nodes belong to ``servers``.

    Raises:
        ServerError: a node did not start or the cluster did not form in time.
    """
    members = [
        servers.start(f"cluster-{i}", redis_cluster_node_command(servers.workdir))
        for i in range(nodes)
    ]
    cli = binary("redis-cli") or "redis-cli"
    create = [cli, "--cluster", "create", *(m.address for m in members)]
    create += ["--cluster-replicas", "0", "--cluster-yes"]
    try:
        result = subprocess.run(create, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"redis-cli --cluster create timed out: {exc}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise ServerError(f"redis-cli --cluster create failed:\n{output}")
    deadline = time.monotonic() + timeout
    for member in members:
        while _cluster_state(member) != "ok":
            if time.monotonic() > deadline:
                raise ServerError(f"{member} did not reach cluster_state:ok: {member.tail()}")
            time.sleep(0.05)
    return members


def _cluster_state(server: Server) -> str | None:
    client = redis.Redis(server.host, server.port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return str(client.cluster("INFO")["cluster_state"])
    except (redis.RedisError, OSError, KeyError):
        return None
    finally:
        client.close()


def redis_sentinel_command(workdir: Path, service: str, primary: Server) -> Command:
    """A Redis Sentinel (``redis-server --sentinel``) watching ``primary`` as
    ``service``, with a quorum of one. Sentinel rewrites its config file, so each
    gets its own in ``workdir``."""
    path = binary("redis-server") or "redis-server"

    def command(port: int) -> list[str]:
        config = workdir / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind {HOST}\ndir {workdir}\n"
            f"sentinel monitor {service} {primary.host} {primary.port} 1\n"
        )
        return [path, str(config), "--sentinel"]

    return command


# -- memcached ---------------------------------------------------------------------------


def memcached_command(*extra: str, memory_mb: int = 16) -> Command:
    """A throwaway memcached on loopback (TCP only)."""
    path = binary("memcached") or "memcached"
    user = ["-u", "root"] if os.geteuid() == 0 else []

    def command(port: int) -> list[str]:
        return [path, *user, "-l", HOST, "-p", str(port), "-m", str(memory_mb), "-U", "0", *extra]

    return command


def _wait_until_stopped(pid: int, guard: float = 30.0) -> None:
    """Wait until every thread of ``pid`` reports state T (stopped); ``guard`` seconds
    only guard against a hang."""
    deadline = time.monotonic() + guard
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        try:
            states = [
                (task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks.iterdir()
            ]
        except OSError:  # no /proc, or a thread gone meanwhile: look again (or give up)
            if not tasks.exists():
                return
            continue
        if all(state == "T" for state in states):
            return
        time.sleep(0.001)
    raise ServerError(f"process {pid} did not stop within {guard} s of SIGSTOP")
