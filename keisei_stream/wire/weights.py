"""Model weights over Redis: publish, read with verification, and watch for new versions.

Publishing writes the blob ``weights:blob:{sha256}`` first, then ``weights:latest`` and the blob
index in one ``MULTI/EXEC``, then announces the version on ``weights`` (``PUBLISH``); only the
newest ``keep`` blobs stay. Readers verify the SHA-256 (and size). Pub/sub loses what is published while
a client reconnects, so :class:`WeightsWatcher` treats it as a wake-up hint and also polls.

Weights travel as bytes (safetensors); this module does not import torch. Every function takes a
``redis.Redis`` made by :func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import redis

from .atomic import run_atomic
from .client import as_str
from .retry import TRANSIENT_ERRORS
from .keys import Keys


class WeightsError(RuntimeError):
    """The weights blob is missing or its SHA-256 does not match ``weights:latest``."""


def publish_weights(r: redis.Redis, keys: Keys, version: int, data: bytes, dtype: str, keep: int,
                    epoch: str | None = None, wait: tuple[int, int] | None = None) -> str:
    """Publish weights ``data`` (safetensors bytes) as ``version``; returns its SHA-256 (hex).

    In one atomic script (:func:`keisei_stream.wire.atomic.run_atomic`): delete the blobs beyond
    the newest ``keep - 1`` (never the one ``weights:latest`` names), ``SET weights:blob:{sha}``,
    ``HSET weights:latest`` (version, sha256, bytes, dtype, created = unix seconds) and ``ZADD
    weights:index``; then ``PUBLISH weights <version>``. A blob is freed before one is stored, so a
    server at ``maxmemory`` takes the new weights too (the script may pass the limit by the
    difference of two blobs), and only while the run's ``epoch`` is ``epoch`` (when given).
    With ``wait = (replicas, ms)`` the announcement waits until that many replicas hold the
    version (``WAIT``, see :func:`keisei_stream.wire.atomic.run_atomic`): a failover then never
    takes back a version the workers were told of.

    Raises:
        ValueError: ``keep < 1`` or ``version < 0``.
        keisei_stream.wire.atomic.EpochChanged: the server lost the run's data (nothing published).
        redis.exceptions.OutOfMemoryError: full, and the server runs no flagged scripts (Redis < 7).
    """
    if keep < 1 or version < 0:
        raise ValueError("keep must be >= 1 and version >= 0")
    sha = hashlib.sha256(data).hexdigest()
    latest = r.hget(keys.weights_latest, "sha256")
    indexed = r.zrange(keys.weights_index, 0, -keep)  # all but the newest keep - 1
    old = [as_str(s) for s in indexed if as_str(s) not in {sha, as_str(latest) if latest is not None else ""}]
    cmds: list[tuple] = []
    if old:
        cmds += [("DEL", *[keys.weights_blob(s) for s in old]), ("ZREM", keys.weights_index, *old)]
    cmds += [("SET", keys.weights_blob(sha), data),
             ("HSET", keys.weights_latest, "version", int(version), "sha256", sha, "bytes", len(data),
              "dtype", dtype, "created", f"{time.time():.3f}"),
             ("ZADD", keys.weights_index, int(version), sha)]
    run_atomic(r, keys, cmds, epoch, wait)
    r.publish(keys.weights_channel, str(int(version)))
    return sha


def read_latest_info(r: redis.Redis, keys: Keys) -> dict[str, Any] | None:
    """``weights:latest`` as ``{version:int, sha256:str, bytes:int, dtype:str, created:float}``, or None."""
    h = r.hgetall(keys.weights_latest)
    if not h:
        return None
    d = {as_str(k): as_str(v) for k, v in h.items()}
    try:
        return {"version": int(d["version"]), "sha256": d["sha256"], "bytes": int(d.get("bytes", -1)),
                "dtype": d.get("dtype", ""), "created": float(d.get("created", 0.0))}
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"weights:latest is malformed: {exc}") from None


def read_latest_weights(r: redis.Redis, keys: Keys) -> tuple[int, str, bytes] | None:
    """The newest weights as ``(version, sha256, data)``, or None when none were published
    (:func:`read_latest_blob`, its SHA-256 and size verified).

    Raises:
        WeightsError: the blob is missing or does not match ``weights:latest``.
    """
    latest = read_latest_blob(r, keys)
    return None if latest is None else (latest[0]["version"], latest[0]["sha256"], latest[1])


def read_latest_blob(r: redis.Redis, keys: Keys) -> tuple[dict[str, Any], bytes] | None:
    """``(info, data)``: ``weights:latest`` (:func:`read_latest_info`) and the blob it names, its
    SHA-256 (and size) verified, or None when none were published. If the blob was pruned between
    the two reads (a newer version was published meanwhile) the read is retried, so ``info``
    always describes ``data``.

    Raises:
        WeightsError: the blob is missing or does not match ``weights:latest``.
    """
    for _attempt in range(3):
        info = read_latest_info(r, keys)
        if info is None:
            return None
        data = r.get(keys.weights_blob(info["sha256"]))
        if data is None:
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha != info["sha256"] or (info["bytes"] >= 0 and len(data) != info["bytes"]):
            raise WeightsError(f"weights v{info['version']}: sha256 {sha[:12]}.. != {info['sha256'][:12]}.. "
                               f"or size {len(data)} != {info['bytes']}")
        return info, data
    raise WeightsError("weights blob missing for weights:latest")


class WeightsWatcher:
    """Notices new weights versions: pub/sub as a wake-up hint plus polling ``weights:latest``.

    ``poll()`` never blocks: it drains pub/sub messages and, at most every ``poll_s`` seconds,
    reads ``weights:latest``'s version; ``wait(seconds)`` is ``poll()`` after waiting up to that
    long for an announcement (for a client with nothing else to do: it sleeps until a version
    comes). Pub/sub errors are ignored (re-subscribed later): polling alone finds every version.
    """

    def __init__(self, r: redis.Redis, keys: Keys, poll_s: float = 2.0):
        self.r = r
        self.keys = keys
        self.poll_s = float(poll_s)
        self.known = 0  # newest version returned by poll()
        self._next_poll = 0.0
        self._pubsub: Any = None
        self._subscribe()

    def _subscribe(self) -> None:
        try:
            ps = self.r.pubsub(ignore_subscribe_messages=False)  # None must mean 'no data'
            ps.subscribe(self.keys.weights_channel)
            self._pubsub = ps
        except TRANSIENT_ERRORS:
            self._pubsub = None

    def _drain(self, wait_s: float = 0.0) -> int:
        newest = 0
        if self._pubsub is None:
            self._subscribe()
            if self._pubsub is None:
                return 0
        try:
            for i in range(1000):
                msg = self._pubsub.get_message(timeout=wait_s if i == 0 else 0.0)
                if msg is None:
                    break
                if msg.get("type") == "message":
                    try:
                        newest = max(newest, int(as_str(msg["data"])))
                    except ValueError:
                        pass
        except TRANSIENT_ERRORS:
            self._close_pubsub()
        return newest

    def poll(self) -> int | None:
        """The newest version if it is newer than every version returned before, else None."""
        return self.wait(0.0)

    def wait(self, seconds: float) -> int | None:
        """:meth:`poll`, after waiting up to ``seconds`` for a message on the channel (the first
        message ends the wait, also a subscription confirmation; without a subscription it
        sleeps that long, then polls)."""
        newest = self._drain(max(0.0, seconds))
        if self._pubsub is None and seconds > 0:
            time.sleep(seconds)
        now = time.monotonic()
        if newest <= self.known and now >= self._next_poll:
            self._next_poll = now + self.poll_s
            try:
                v = self.r.hget(self.keys.weights_latest, "version")
                if v is not None:
                    newest = max(newest, int(v))
            except (*TRANSIENT_ERRORS, ValueError):
                pass
        if newest > self.known:
            self.known = newest
            return newest
        return None

    def _close_pubsub(self) -> None:
        try:
            if self._pubsub is not None:
                self._pubsub.close()
        except Exception:  # noqa: BLE001
            pass
        self._pubsub = None

    def close(self) -> None:
        """Unsubscribe and release the pub/sub connection."""
        self._close_pubsub()
