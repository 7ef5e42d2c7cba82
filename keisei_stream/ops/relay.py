"""A host's read-only copy of a run, kept by ``keisei relay``: weights fan out by host, not by worker.

Every worker reads the run's config, ``control`` and each weights version, and waits for the
announcements of new versions. Read from the primary, a version (6.33 MB for the gpu net in
bfloat16) would cross the primary's link once per worker; read from a copy on the worker's own
host it crosses once per host. The relay is that copy's keeper: it logs in to the primary as the
run's ``reader`` user (:mod:`keisei_stream.ops.acl`), starts a private Redis on this host (a unix
socket, :func:`keisei_stream.ops.embedded_redis.start_redis`) with the same ``reader`` user, and
copies, in :meth:`Relay.step`:

1. each new weights version: the watcher on the primary (its pub/sub announcement, and a poll of
   ``weights:latest`` every :data:`POLL_S` seconds as the safety net) -> the version read and
   its SHA-256 checked (:func:`keisei_stream.wire.weights.read_latest_blob`) -> published on
   the host's server with the same bytes (:func:`keisei_stream.wire.weights.publish_weights`, the
   newest two blobs kept), whose announcement wakes the host's workers; versions only go
   forwards (a lower one is taken only once the run's epoch changed: a new run);
2. ``control`` every :data:`keisei_stream.wire.status.CONTROL_S` seconds, ``config`` and
   ``epoch`` every :data:`SYNC_S` seconds, each written only when it changed.

The workers still verify every version's SHA-256 themselves, and write everything (experience,
heartbeats) to the primary: ``python -m workers --redis PRIMARY --read-redis HOST_COPY``. The
relay costs the primary about 2 commands a second and one blob a version, whatever the number of
workers on its host. (A replica per host, ``replicaof`` the primary, does the same job with
Redis's own replication, but also copies every write of the run to every host, experience
included: docs/scaling.md compares them.)

Never imports torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from keisei_stream.ops import acl, compat, embedded_redis
from keisei_stream.wire import client, retry
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import CONTROL_S
from keisei_stream.wire.weights import WeightsError, WeightsWatcher, publish_weights, read_latest_blob

log = logging.getLogger("keisei.relay")

#: Seconds between reads of ``config`` and ``epoch`` on the primary.
SYNC_S = 5.0
#: Seconds between the relay's polls of ``weights:latest`` on the primary (the workers' default
#: ``stream.weights_poll_s``; the relay starts before the run's config may exist).
POLL_S = 2.0
#: Weights blobs kept on the host's server (a worker reading the previous one still finds it).
KEEP = 2


@dataclass
class Relay:
    """Copies what a host's workers read from the run's primary (``src``) to the host's server
    (``dst``, written as its admin). ``version`` is the newest version copied; ``copied`` counts
    the versions copied, ``refused`` those whose SHA-256 did not match."""

    src: redis.Redis
    dst: redis.Redis
    keys: Keys
    watcher: WeightsWatcher
    version: int = 0
    copied: int = 0
    refused: int = 0
    request_limit: int = embedded_redis.MIN_REQUEST_LIMIT  # the host's server's proto-max-bulk-len
    _values: dict[str, bytes | None] = field(default_factory=dict)
    _next_control: float = 0.0
    _next_sync: float = 0.0

    def step(self, wait_s: float = 0.5) -> None:
        """Wait up to ``wait_s`` for an announcement, then copy what is due (see the module doc)."""
        now = time.monotonic()
        if now >= self._next_sync:
            self._next_sync = now + SYNC_S
            if self._copy(self.keys.epoch) and self.version:
                log.warning("the run's epoch changed on the primary: the next version is taken whatever its number")
                self.version = 0
                self.watcher.known = 0
            self._copy(self.keys.config)
        if now >= self._next_control:
            self._next_control = now + CONTROL_S
            self._copy(self.keys.control)
        due = min(self._next_control, self._next_sync) - time.monotonic()
        announced = self.watcher.wait(max(0.0, min(wait_s, due)))
        if announced is not None and announced > self.version:
            self.copy_weights()

    def _copy(self, key: str) -> bool:
        """Copy string ``key`` (deleted on the host when gone from the primary) if it changed
        since the last copy; True when it did (after a first copy)."""
        value = self.src.get(key)
        if key in self._values and self._values[key] == value:
            return False
        first = key not in self._values
        if value is None:
            self.dst.delete(key)
        else:
            self.dst.set(key, value)
        self._values[key] = value
        return not first

    def copy_weights(self) -> None:
        """The newest version from the primary (SHA-256 checked) to the host's server, if newer
        than the last one copied."""
        try:
            latest = read_latest_blob(self.src, self.keys)
        except WeightsError as exc:
            self.refused += 1
            log.error("weights refused: %s", exc)
            return
        if latest is None or latest[0]["version"] <= self.version:
            return
        info, data = latest
        version, sha = info["version"], info["sha256"]
        limit = embedded_redis.request_limit_for(len(data))
        if limit > self.request_limit:  # the host's copy admits this blob (its readers send only small requests)
            for name, value in embedded_redis.request_limits(limit).items():
                self.dst.config_set(name, value)
            self.request_limit = limit
        publish_weights(self.dst, self.keys, version, data, info["dtype"], KEEP)
        self.version, self.copied = version, self.copied + 1
        log.info("version %d copied to this host (%d bytes, sha256 %s..)", version, len(data), sha[:12])


def start_host_copy(src_url: str, run_id: str, socket_path: Path, run_dir: Path,
                    maxmemory: str = "0") -> tuple[Relay, embedded_redis.RedisServer, str]:
    """Start the host's server on ``socket_path`` (log in ``run_dir``), create the ``reader`` user
    there with the password of ``src_url``'s user, and the :class:`Relay` between them.

    Args:
        src_url: the primary, as the run's ``reader`` user (``redis://`` or ``redis+sentinel://``).
        maxmemory: the host's server's ``maxmemory`` (``0``: no limit; it holds two blobs and
            small keys, and its replies to the workers are buffered outside its data).

    Returns:
        ``(relay, server, read_url)``: ``read_url`` is what the host's workers pass as
        ``--read-redis`` (the ``reader`` user on the socket, password included).

    Raises:
        embedded_redis.RedisStartError: the server did not start.
        ValueError: ``src_url`` has no password (the reader's is needed for the host's copy).
    """
    src = client.connect(src_url)
    password = src.connection_pool.connection_kwargs.get("password")
    if not password:
        raise ValueError("the relay's --redis URL needs the reader user's password: the host's workers log in with it")
    server = embedded_redis.start_redis(run_dir, maxmemory=maxmemory, socket_path=socket_path,
                                        max_request_bytes=embedded_redis.MIN_REQUEST_LIMIT)
    try:
        dst = client.connect(server.url)
        acl.create_user(dst, run_id, "reader", password, compat.server_info(dst))
    except BaseException:
        server.stop()
        raise
    keys = Keys(run_id)
    relay = Relay(src, dst, keys, WeightsWatcher(src, keys, poll_s=POLL_S))
    return relay, server, acl.user_url(server.url, acl.username(run_id, "reader"), password)


def run_relay(relay: Relay, stop: retry.StopFlag) -> None:
    """:meth:`Relay.step` until ``stop`` (SIGTERM/SIGINT); Redis outages are waited out by the
    clients' retry policy (a stop during one ends the wait)."""
    try:
        while not stop.requested:
            relay.step()
    except retry.TRANSIENT_ERRORS as exc:  # only when stopped during an outage
        log.warning("stopped while Redis is unreachable: %s", exc)
    finally:
        relay.watcher.close()
