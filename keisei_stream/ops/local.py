"""The Redis of a local run (``keisei run``): a private, persistent server with the run's users
and the run's roster of workers, started with request-size limits fitted to the run's largest
honest request (:func:`request_limit`), or a server given by URL; either way checked for a
supported version first.

Imports torch only in :func:`request_limit` (the size of the model's weights).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from keisei_stream.config import Config
from keisei_stream.ops import acl, compat, embedded_redis
from keisei_stream.wire import client, codec
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import register_workers

#: The file with the private server's user names and passwords (mode 600).
USERS_FILE = "redis-users.json"


def request_limit(cfg: Config) -> int:
    """The ``proto-max-bulk-len`` of the run's private server (``client-query-buffer-limit`` is
    twice it), in bytes: :func:`keisei_stream.ops.embedded_redis.request_limit_for` the largest
    honest request (twice it, rounded up to a MiB, at least 1 MiB, Redis's minimum). The largest requests are a worker's entry of at most
    ``stream.batch_positions + worker.segment_plies + worker.lookahead_plies`` positions (a worker
    sends once it holds ``batch_positions``, in whole segments of at most ``segment_plies +
    lookahead_plies`` positions; :func:`keisei_stream.wire.codec.max_entry_bytes`) and the
    learner's weights blob in ``stream.weights_dtype``
    (:func:`keisei_stream.rl.checkpoint.weights_bytes_bound`); a request above it is refused and its
    client disconnected."""
    from keisei_stream.rl.checkpoint import weights_bytes_bound  # torch: only here

    positions = cfg.stream.batch_positions + cfg.worker.segment_plies + cfg.worker.lookahead_plies
    largest = max(codec.max_entry_bytes(positions), weights_bytes_bound(cfg.model, cfg.stream.weights_dtype))
    return embedded_redis.request_limit_for(largest)


def gpu_count() -> int:
    """The GPUs ``nvidia-smi -L`` lists (0 without the tool, a driver or a GPU): how ``keisei run``
    places its workers without importing torch (about 2 s) into the supervisor."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def worker_devices(config_device: str, workers: int, gpus: int) -> list[str | None]:
    """The ``--device`` of each of ``workers`` workers: with GPUs and ``worker.device`` ``auto`` or
    ``cuda``, ``cuda:0``, ``cuda:1``, ... round-robin over the ``gpus``; otherwise None (the
    worker takes its config's device)."""
    if not gpus or config_device not in ("auto", "cuda"):
        return [None] * workers
    return [f"cuda:{i % gpus}" for i in range(workers)]


@dataclass
class RunRedis:
    """The run's Redis.

    Attributes:
        url: the admin's URL (the private server's default user on its unix socket; or ``--redis``).
        urls: role -> the URL its processes use (``learner``, ``worker:{id}``...; with
            ``--redis`` every role gets ``url``).
        server: the private server (None with ``--redis``). info: its version.
        passwords: role -> password of the private server's users (empty with ``--redis``).
    """

    url: str
    urls: dict[str, str]
    info: compat.ServerInfo
    server: embedded_redis.RedisServer | None = None
    passwords: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    maxmemory: str = "1gb"
    appendfsync: str = "everysec"
    max_request_bytes: int | None = None

    def url_for(self, role: str) -> str:
        """The URL of ``role`` (``learner``, ``worker:{id}``...): its user's, else the admin's."""
        return self.urls.get(role, self.url)

    def alive(self) -> bool:
        """True while the private server runs (always True with ``--redis``: not ours to watch)."""
        return self.server is None or self.server.alive()

    def returncode(self) -> int | None:
        return None if self.server is None else self.server.process.returncode

    def restart(self) -> None:
        """Start the private server again on its directory (it loads its append-only file) and
        create the run's users again with their passwords (ACL users are not in the file)."""
        old = self.server
        if old is None:
            return
        if old.alive():
            old.process.kill()
        old.process.wait()
        self.server = embedded_redis.start_redis(old.run_dir, maxmemory=self.maxmemory, appendonly=True,
                                                 appendfsync=self.appendfsync, socket_path=old.socket_path,
                                                 max_request_bytes=self.max_request_bytes)
        self.server._tmpdir, old._tmpdir = old._tmpdir, None  # the same socket (a short path) goes on
        _create_users(self.server.url, self.run_id, [r[len("worker:"):] for r in self.passwords
                                                      if r.startswith("worker:")], self.passwords, self.info)

    def stop(self) -> bool:
        """Stop the private server (SIGTERM, SIGKILL after a grace period); True when it had to be
        killed. Nothing to do with ``--redis``."""
        return self.server is not None and self.server.stop()


def _create_users(url: str, run_id: str, workers: list[str], passwords: dict[str, str] | None,
                  server: compat.ServerInfo) -> dict[str, str]:
    """The run's users, and its workers on the roster (:func:`keisei_stream.ops.acl.create_on_nodes`,
    as ``keisei users`` makes them), on the server of ``url`` whose version ``server`` was checked
    at start (not asked again, also not after a restart)."""
    admin = client.connect(url)
    try:
        return acl.create_on_nodes([admin], run_id, workers, passwords, servers=[server])
    finally:
        admin.close()


def check_server(url: str) -> compat.ServerInfo:
    """The server's version, checked (:func:`keisei_stream.ops.compat.require_supported`).

    Raises:
        compat.UnsupportedServer: older than the minimum (the message names it).
    """
    r = client.connect(url)
    try:
        return compat.require_supported(r)
    finally:
        r.close()


def start_private_redis(run_dir: Path, run_id: str, workers: list[str], *, resume: bool, maxmemory: str,
                        appendfsync: str, say: Callable[[str], None] = print,
                        max_request_bytes: int | None = None) -> RunRedis:
    """The run's private Redis: persistent (append-only file in ``run_dir/appendonlydir`` with
    ``appendfsync``), with a user per role and per worker id (:mod:`keisei_stream.ops.acl`;
    names and passwords in ``run_dir/redis-users.json``, mode 600), the workers on the run's
    roster, and ``max_request_bytes`` (:func:`request_limit`; None: the server's defaults) as its
    request-size limits. Without ``resume`` it begins
    from an empty server (the previous append-only file is removed); with ``resume`` the server
    loads it, so the stream, its pending entries and the accounting are back.

    Raises:
        embedded_redis.RedisStartError: the server did not start.
        compat.UnsupportedServer: the server binary is too old (it is stopped again).
    """
    aof = run_dir / "appendonlydir"
    if aof.exists() and not resume:
        say(f"starting fresh: removing the previous run's Redis data in {aof} (--resume continues it)")
        shutil.rmtree(aof)
    server = embedded_redis.start_redis(run_dir, maxmemory=maxmemory, appendonly=True, appendfsync=appendfsync,
                                        max_request_bytes=max_request_bytes)
    try:
        info = check_server(server.url)
        passwords = _create_users(server.url, run_id, workers, None, info)
    except BaseException:
        server.stop()
        raise
    users = run_dir / USERS_FILE
    users.touch(mode=0o600)
    users.write_text(json.dumps({acl.username(run_id, role): pw for role, pw in passwords.items()}, indent=2))
    urls = {role: acl.user_url(server.url, acl.username(run_id, role), pw) for role, pw in passwords.items()}
    return RunRedis(server.url, urls, info, server, passwords, run_id, maxmemory, appendfsync, max_request_bytes)


def use_redis(url: str, run_id: str, workers: list[str]) -> RunRedis:
    """A run on the server at ``url`` (``--redis``): every process uses that URL; the run's
    ``workers`` go on its roster.

    Raises:
        compat.UnsupportedServer: the server is too old.
    """
    info = check_server(url)
    r = client.connect(url)
    try:
        register_workers(r, Keys(run_id), workers)
    finally:
        r.close()
    return RunRedis(url, {}, info, run_id=run_id)
