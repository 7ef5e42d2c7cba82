"""Redis transport: experience stream (producer / consumer group), weights, heartbeats, control.

Semantics (DESIGN.md, "Semantics"):

* **Admission** (:class:`Producer`): one Lua script checks the backlog, makes the add idempotent
  and ``XADD``\\ s, all atomically. The backlog is ``XLEN experience``: the learner deletes
  (``XDEL``) every entry it acknowledges, so the stream holds exactly the unacknowledged entries
  (delivered-but-pending plus never-delivered). ``MAXLEN`` is never used on this stream. A full
  stream makes the producer wait with exponential backoff (it keeps its games); a lost
  connection makes it retry. A retry of a script call that did run is recognised by the
  ``producers`` hash (``worker -> "session:seq"``) and not added twice.
* **Consumption** (:class:`Consumer`): group ``learners`` (created at id 0 with ``MKSTREAM``).
  ``read()`` returns, in this order: this consumer's own pending entries (``XREADGROUP`` id 0,
  after a restart), entries idle for more than ``claim_idle_ms`` in dead consumers' pending
  lists (``XAUTOCLAIM``, re-scanned every ``claim_idle_ms / 2``), then new entries
  (``XREADGROUP >`` with ``BLOCK``). Bad entries go to the capped ``deadletter`` stream and
  duplicates (same ``batch_id``) are dropped; both are acknowledged and deleted at once and
  counted. Good entries are acknowledged and deleted only by :meth:`Consumer.ack`, after the
  update that used them (at-least-once).
* **Weights**: blob ``weights:blob:{sha256}`` first, then ``weights:latest`` and the blob index
  in one ``MULTI/EXEC``, then ``PUBLISH`` on ``weights``; only the newest ``keep`` blobs stay.
  Readers verify the SHA-256. :class:`WeightsWatcher` treats pub/sub as a hint and polls.

Every function takes a ``redis.Redis`` made by :func:`keisei_stream.wire.embedded_redis.connect`
(``decode_responses=False``; socket timeout above every ``BLOCK``).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .codec import BadEntry, ExperienceBatch, decode_entry, encode_batch, entry_positions
from .keys import ACCOUNTING_FIELDS, Keys

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)

#: Deadletter entries keep at most this many bytes of each raw field, and at most 16 fields.
DEADLETTER_FIELD_BYTES = 4096

# KEYS: experience, accounting, producers
# ARGV: max_backlog, producer id, session, seq, positions, then field/value pairs for XADD
# Returns {1, id} added, {2, ""} already added (a retry), {0, xlen} stream full.
_ADMIT_LUA = """
local last = redis.call('HGET', KEYS[3], ARGV[2])
if last then
  local sep = string.find(last, ':', 1, true)
  if sep and string.sub(last, 1, sep - 1) == ARGV[3]
     and tonumber(string.sub(last, sep + 1)) >= tonumber(ARGV[4]) then
    return {2, ''}
  end
end
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[1]) then
  return {0, len}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6))
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3] .. ':' .. ARGV[4])
redis.call('HINCRBY', KEYS[2], 'produced_positions', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'produced_batches', 1)
return {1, id}
"""


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, (bytes, bytearray)) else str(x)


def _sleep_interruptible(seconds: float, should_stop: Callable[[], bool] | None, slice_s: float = 0.05) -> bool:
    """Sleep ``seconds``, checking ``should_stop`` every ``slice_s``; True if it said stop."""
    end = time.monotonic() + seconds
    while True:
        if should_stop is not None and should_stop():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(slice_s, left))


# ============================================================================================
# producer


class Producer:
    """Adds experience batches under the backlog limit (one per worker process).

    Args:
        r: client (``decode_responses=False``).
        keys: the run's keys.
        worker_id: this worker's id (field ``w``; the idempotency record is per worker id).
        max_backlog: entries allowed in the stream (unacknowledged) before producers wait.
        backoff_max_s: cap of the exponential wait (starts at 10 ms, doubles).

    Attributes:
        waited_s: total seconds spent waiting for room or for the server.
        session: random id of this producer instance; batch ids are ``{worker}:{session}:{seq}``.
        seq: sequence number of the next batch.
    """

    def __init__(self, r: redis.Redis, keys: Keys, worker_id: str, max_backlog: int, backoff_max_s: float = 2.0):
        if max_backlog < 1:
            raise ValueError("max_backlog must be >= 1")
        self.r = r
        self.keys = keys
        self.worker_id = worker_id
        self.max_backlog = int(max_backlog)
        self.backoff_max_s = float(backoff_max_s)
        self.session = uuid.uuid4().hex[:12]
        self.seq = 0
        self.waited_s = 0.0
        self.full_waits = 0
        self.retries = 0
        self._script = r.register_script(_ADMIT_LUA)

    def next_batch_id(self) -> str:
        """The id the next sent batch gets."""
        return f"{self.worker_id}:{self.session}:{self.seq}"

    def send(self, batch: ExperienceBatch, should_stop: Callable[[], bool] | None = None,
             on_wait: Callable[[float], None] | None = None) -> bool:
        """Add ``batch`` (its ``batch_id`` and ``worker_id`` are set here) to the stream.

        Waits while the stream is full (XLEN >= max_backlog) and retries after connection
        errors, with exponential backoff (10 ms doubling up to ``backoff_max_s``), calling
        ``should_stop()`` at least every 50 ms and ``on_wait(seconds)`` after each wait.

        Returns:
            True once the batch is in the stream (exactly once, even across retries);
            False when ``should_stop()`` said stop first: the batch was not added (or, if a
            connection broke after the server added it, a later ``send`` of the same batch
            is recognised and not added twice), the caller keeps it.
        """
        batch.batch_id = self.next_batch_id()
        batch.worker_id = self.worker_id
        fields = encode_batch(batch)
        argv: list[Any] = [self.max_backlog, self.worker_id, self.session, self.seq, batch.num_positions]
        for k, v in fields.items():
            argv += [k, v]
        delay = 0.01
        while True:
            if should_stop is not None and should_stop():
                return False
            try:
                status, _ = self._script(keys=[self.keys.experience, self.keys.accounting, self.keys.producers], args=argv)
            except _TRANSIENT:
                self.retries += 1
                status = -1
            if int(status) in (1, 2):
                self.seq += 1
                return True
            if int(status) == 0:
                self.full_waits += 1
            t0 = time.monotonic()
            stopped = _sleep_interruptible(delay, should_stop)
            waited = time.monotonic() - t0
            self.waited_s += waited
            if on_wait is not None:
                on_wait(waited)
            if stopped:
                return False
            delay = min(delay * 2, self.backoff_max_s)


# ============================================================================================
# consumer


@dataclass
class Delivered:
    """One good entry handed to the learner: its stream id and the decoded batch."""

    entry_id: str
    batch: ExperienceBatch


def ensure_group(r: redis.Redis, keys: Keys) -> None:
    """Create the ``learners`` group on the experience stream at id 0 (MKSTREAM); idempotent."""
    try:
        r.xgroup_create(keys.experience, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Consumer:
    """A learner's reader on the ``learners`` group.

    Args:
        r: client whose socket timeout exceeds ``block_ms``.
        keys: the run's keys.
        consumer_name: unique and stable per learner (a restarted learner that reuses it gets its
            own pending entries back first).
        max_plies: ``env.max_plies`` for validation.
        block_ms: XREADGROUP BLOCK for new entries.
        count: entries per read.
        claim_idle_ms: pending entries idle longer than this in other consumers are claimed.
        deadletter_maxlen: approximate cap of the deadletter stream.
        check_legal: full replay validation (see :func:`keisei_stream.wire.codec.decode_entry`).
        dedup_window: how many recent batch ids are remembered for duplicate detection.

    Attributes:
        in_flight: ids delivered by this consumer and not yet acknowledged.
        stats: local counters (``good``, ``bad``, ``duplicate``, ``claimed``, ``own_pending``).
    """

    def __init__(self, r: redis.Redis, keys: Keys, consumer_name: str, *, max_plies: int, block_ms: int = 1000,
                 count: int = 16, claim_idle_ms: int = 60_000, deadletter_maxlen: int = 10_000,
                 check_legal: bool = True, dedup_window: int = 100_000):
        self.r = r
        self.keys = keys
        self.name = consumer_name
        self.max_plies = int(max_plies)
        self.block_ms = int(block_ms)
        self.count = int(count)
        self.claim_idle_ms = int(claim_idle_ms)
        self.deadletter_maxlen = int(deadletter_maxlen)
        self.check_legal = check_legal
        self.dedup_window = int(dedup_window)
        self.in_flight: dict[str, int] = {}  # entry id -> positions
        self._seen: dict[str, str] = {}  # batch_id -> entry id (insertion ordered, bounded)
        self._own_cursor: str | None = "0"  # None once our own pending list was re-read
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self.stats = {"good": 0, "bad": 0, "duplicate": 0, "claimed": 0, "own_pending": 0}
        ensure_group(r, keys)

    # -- reading -----------------------------------------------------------------------------
    def read(self, block_ms: int | None = None) -> list[Delivered]:
        """The next good entries (possibly none), in the order described in the module doc.

        Bad entries and duplicates met on the way are dead-lettered / dropped and acknowledged
        here. Blocks at most ``block_ms`` (default: the constructor's) when nothing is pending.

        Raises:
            redis.ConnectionError / redis.TimeoutError: when the server is unreachable after the
                client's own retries (the caller may retry; nothing is lost).
        """
        if self._own_cursor is not None:
            resp = self.r.xreadgroup(self.keys.group, self.name, {self.keys.experience: self._own_cursor},
                                     count=self.count)
            entries = _stream_entries(resp)
            if entries:
                self._own_cursor = _s(entries[-1][0])
                self.stats["own_pending"] += len(entries)
                return self._process(entries)
            self._own_cursor = None
        now = time.monotonic()
        if now >= self._next_claim:
            claimed = self._autoclaim()
            if claimed is not None:
                return claimed
            self._next_claim = now + self.claim_idle_ms / 2000.0
        resp = self.r.xreadgroup(self.keys.group, self.name, {self.keys.experience: ">"}, count=self.count,
                                 block=self.block_ms if block_ms is None else int(block_ms))
        return self._process(_stream_entries(resp))

    def _autoclaim(self) -> list[Delivered] | None:
        """One XAUTOCLAIM page; None when the scan is complete (cursor back at 0-0)."""
        resp = self.r.xautoclaim(self.keys.experience, self.keys.group, self.name, min_idle_time=self.claim_idle_ms,
                                 start_id=self._claim_cursor, count=self.count)
        cursor = _s(resp[0])
        entries = [e for e in resp[1] if e is not None and e[1] and _s(e[0]) not in self.in_flight]
        self._claim_cursor = cursor
        if entries:
            self.stats["claimed"] += len(entries)
            return self._process(entries)
        if cursor in ("0-0", "0"):
            self._claim_cursor = "0-0"
            return None
        return []  # more pages to scan; come back next call

    def _process(self, entries: list[tuple[Any, Any]]) -> list[Delivered]:
        good: list[Delivered] = []
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            if entry_id in self.in_flight:
                continue  # already handed out by this consumer (re-delivery of our own pending)
            if not fields:  # deleted while pending (redis-py gives None or {}); XADD needs >= 1 field
                self.r.xack(self.keys.experience, self.keys.group, entry_id)
                continue
            try:
                batch = decode_entry(fields, max_plies=self.max_plies, check_legal=self.check_legal)
            except BadEntry as exc:
                self._reject(entry_id, fields, exc.reason)
                continue
            if batch.batch_id in self._seen and self._seen[batch.batch_id] != entry_id:
                self._drop_duplicate(entry_id, batch)
                continue
            self._remember(batch.batch_id, entry_id)
            self.in_flight[entry_id] = batch.num_positions
            self.stats["good"] += 1
            good.append(Delivered(entry_id, batch))
        return good

    def _remember(self, batch_id: str, entry_id: str) -> None:
        self._seen[batch_id] = entry_id
        while len(self._seen) > self.dedup_window:
            self._seen.pop(next(iter(self._seen)))

    def _reject(self, entry_id: str, fields: Mapping[Any, Any], reason: str) -> None:
        dl: dict[str, Any] = {"reason": reason, "entry_id": entry_id, "consumer": self.name}
        raw_total = 0
        for i, (k, v) in enumerate(fields.items()):
            if i >= 16:
                dl["raw_truncated_fields"] = len(fields) - 16
                break
            kb = k if isinstance(k, bytes) else str(k).encode()
            vb = v if isinstance(v, bytes) else str(v).encode()
            raw_total += len(vb)
            if kb == b"w":
                dl["worker"] = vb[:200]
            dl[b"raw:" + kb[:64]] = vb[:DEADLETTER_FIELD_BYTES]
        dl["raw_bytes"] = raw_total
        n = entry_positions(fields)
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.deadletter, dl, maxlen=self.deadletter_maxlen, approximate=True)
        pipe.xack(self.keys.experience, self.keys.group, entry_id)
        pipe.xdel(self.keys.experience, entry_id)
        pipe.hincrby(self.keys.accounting, "rejected_entries", 1)
        pipe.hincrby(self.keys.accounting, "rejected_positions", n)
        pipe.execute()
        self.stats["bad"] += 1

    def _drop_duplicate(self, entry_id: str, batch: ExperienceBatch) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.keys.experience, self.keys.group, entry_id)
        pipe.xdel(self.keys.experience, entry_id)
        pipe.hincrby(self.keys.accounting, "duplicate_entries", 1)
        pipe.hincrby(self.keys.accounting, "duplicate_positions", batch.num_positions)
        pipe.execute()
        self.stats["duplicate"] += 1

    # -- acknowledging -----------------------------------------------------------------------
    def ack(self, entries: Iterable[Delivered | str], trained_positions: int, stale_positions: int) -> None:
        """Acknowledge and delete ``entries`` after the update that used them, in one MULTI/EXEC.

        Adds ``trained_positions`` / ``stale_positions`` to the accounting (their sum should be
        the entries' positions). Idempotent per entry on the server (XACK/XDEL of an acked id
        are no-ops; counters are added again, so do not call twice for the same update).
        """
        ids = [e.entry_id if isinstance(e, Delivered) else str(e) for e in entries]
        pipe = self.r.pipeline(transaction=True)
        if ids:
            pipe.xack(self.keys.experience, self.keys.group, *ids)
            pipe.xdel(self.keys.experience, *ids)
            pipe.hincrby(self.keys.accounting, "acked_entries", len(ids))
        pipe.hincrby(self.keys.accounting, "trained_positions", int(trained_positions))
        pipe.hincrby(self.keys.accounting, "stale_positions", int(stale_positions))
        pipe.execute()
        for i in ids:
            self.in_flight.pop(i, None)


def _stream_entries(resp: Any) -> list[tuple[Any, Any]]:
    """Flatten an XREADGROUP reply (RESP2 list or RESP3 dict) for one stream into (id, fields)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        out: list[tuple[Any, Any]] = []
        for v in resp.values():
            for item in (v[0] if v and isinstance(v[0], list) and v and isinstance(v[0][0], (list, tuple)) else v):
                out.append((item[0], item[1]))
        return out
    out = []
    for _stream, items in resp:
        for item in items:
            out.append((item[0], item[1]))
    return out


# ============================================================================================
# weights


class WeightsError(RuntimeError):
    """The weights blob is missing or its SHA-256 does not match ``weights:latest``."""


def publish_weights(r: redis.Redis, keys: Keys, version: int, data: bytes, dtype: str, keep: int) -> str:
    """Publish weights ``data`` (safetensors bytes) as ``version``; returns its SHA-256 (hex).

    Order: ``SET weights:blob:{sha}``; then in one MULTI/EXEC ``HSET weights:latest`` (version,
    sha256, bytes, dtype, created = unix seconds) and ``ZADD weights:index``; then ``PUBLISH
    weights <version>``; then blobs beyond the newest ``keep`` (by version) are deleted (never
    the one just published).

    Raises:
        ValueError: ``keep < 1`` or ``version < 0``.
    """
    if keep < 1 or version < 0:
        raise ValueError("keep must be >= 1 and version >= 0")
    sha = hashlib.sha256(data).hexdigest()
    r.set(keys.weights_blob(sha), data)
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.weights_latest, mapping={"version": int(version), "sha256": sha, "bytes": len(data),
                                            "dtype": dtype, "created": f"{time.time():.3f}"})
    pipe.zadd(keys.weights_index, {sha: int(version)})
    pipe.execute()
    r.publish(keys.weights_channel, str(int(version)))
    old = r.zrange(keys.weights_index, 0, -(keep + 1))
    old = [s for s in old if _s(s) != sha]
    if old:
        pipe = r.pipeline(transaction=True)
        pipe.delete(*[keys.weights_blob(_s(s)) for s in old])
        pipe.zrem(keys.weights_index, *old)
        pipe.execute()
    return sha


def read_latest_info(r: redis.Redis, keys: Keys) -> dict[str, Any] | None:
    """``weights:latest`` as ``{version:int, sha256:str, bytes:int, dtype:str, created:float}``, or None."""
    h = r.hgetall(keys.weights_latest)
    if not h:
        return None
    d = {_s(k): _s(v) for k, v in h.items()}
    try:
        return {"version": int(d["version"]), "sha256": d["sha256"], "bytes": int(d.get("bytes", -1)),
                "dtype": d.get("dtype", ""), "created": float(d.get("created", 0.0))}
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"weights:latest is malformed: {exc}") from None


def read_latest_weights(r: redis.Redis, keys: Keys) -> tuple[int, str, bytes] | None:
    """The newest weights as ``(version, sha256, data)``, or None when none were published.

    The blob's SHA-256 (and size) are verified; if the blob was pruned between the two reads
    (a newer version was published meanwhile) the read is retried.

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
        return info["version"], sha, data
    raise WeightsError("weights blob missing for weights:latest")


class WeightsWatcher:
    """Notices new weights versions: pub/sub as a wake-up hint plus polling ``weights:latest``.

    ``poll()`` never blocks: it drains pub/sub messages and, at most every ``poll_s`` seconds,
    reads ``weights:latest``'s version. Pub/sub errors are ignored (re-subscribed later):
    polling alone finds every version.
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
        except _TRANSIENT:
            self._pubsub = None

    def _drain(self) -> int:
        newest = 0
        if self._pubsub is None:
            self._subscribe()
            if self._pubsub is None:
                return 0
        try:
            for _ in range(1000):
                msg = self._pubsub.get_message(timeout=0.0)
                if msg is None:
                    break
                if msg.get("type") == "message":
                    try:
                        newest = max(newest, int(_s(msg["data"])))
                    except ValueError:
                        pass
        except _TRANSIENT:
            self._close_pubsub()
        return newest

    def poll(self) -> int | None:
        """The newest version if it is newer than every version returned before, else None."""
        newest = self._drain()
        now = time.monotonic()
        if newest <= self.known and now >= self._next_poll:
            self._next_poll = now + self.poll_s
            try:
                v = self.r.hget(self.keys.weights_latest, "version")
                if v is not None:
                    newest = max(newest, int(v))
            except (_TRANSIENT + (ValueError,)):
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


# ============================================================================================
# heartbeats, status, streams, control, accounting


def _flat(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, float):
            v = repr(v)
        elif v is None:
            v = ""
        elif not isinstance(v, (int, str, bytes)):
            v = str(v)
        out[str(k)] = v
    return out


def write_worker_heartbeat(r: redis.Redis, keys: Keys, worker_id: str, fields: Mapping[str, Any], ttl_s: float) -> None:
    """``HSET workers:{id}`` (plus ``id``, ``last_seen`` unix seconds) with a TTL of ``ttl_s``."""
    k = keys.worker(worker_id)
    data = _flat({"id": worker_id, "last_seen": time.time(), "pid": os.getpid(), **fields})
    pipe = r.pipeline(transaction=True)
    pipe.hset(k, mapping=data)
    pipe.pexpire(k, max(1, int(ttl_s * 1000)))
    pipe.execute()


def read_workers(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    """Every live worker heartbeat as a dict of strings (sorted by id)."""
    out = []
    for k in r.scan_iter(match=keys.workers_pattern, count=200):
        h = r.hgetall(k)
        if h:
            d = {_s(a): _s(b) for a, b in h.items()}
            d.setdefault("id", _s(k).rsplit(":", 1)[-1])
            out.append(d)
    return sorted(out, key=lambda d: d.get("id", ""))


def write_learner_status(r: redis.Redis, keys: Keys, fields: Mapping[str, Any]) -> None:
    """``HSET learner`` with ``fields`` (plus ``updated`` unix seconds)."""
    r.hset(keys.learner, mapping=_flat({**fields, "updated": time.time()}))


def read_learner_status(r: redis.Redis, keys: Keys) -> dict[str, str]:
    """The ``learner`` hash as strings (empty when absent)."""
    return {_s(a): _s(b) for a, b in r.hgetall(keys.learner).items()}


def append_metrics(r: redis.Redis, keys: Keys, fields: Mapping[str, Any], maxlen: int) -> str:
    """``XADD metrics MAXLEN ~ maxlen``; returns the entry id."""
    return _s(r.xadd(keys.metrics, _flat(fields), maxlen=maxlen, approximate=True))


def append_game(r: redis.Redis, keys: Keys, record_fields: Mapping[str, Any], maxlen: int) -> str:
    """``XADD games MAXLEN ~ maxlen`` (e.g. ``GameRecord.to_dict()`` plus worker/version)."""
    return _s(r.xadd(keys.games, _flat(record_fields), maxlen=maxlen, approximate=True))


def append_eval(r: redis.Redis, keys: Keys, fields: Mapping[str, Any], maxlen: int) -> str:
    """``XADD eval MAXLEN ~ maxlen``."""
    return _s(r.xadd(keys.eval, _flat(fields), maxlen=maxlen, approximate=True))


def read_stream(r: redis.Redis, key: str, count: int = 100) -> list[tuple[str, dict[str, str]]]:
    """The newest ``count`` entries of a capped stream, oldest first, as strings."""
    items = r.xrevrange(key, count=count)
    return [(_s(i), {_s(a): _s(b) for a, b in f.items()}) for i, f in reversed(items)]


CONTROL_VALUES = ("run", "pause", "stop")


def get_control(r: redis.Redis, keys: Keys) -> str:
    """``run``, ``pause`` or ``stop``; ``run`` when unset or unrecognised."""
    v = r.get(keys.control)
    v = _s(v).strip().lower() if v is not None else "run"
    return v if v in CONTROL_VALUES else "run"


def set_control(r: redis.Redis, keys: Keys, value: str) -> None:
    """Set the control key.

    Raises:
        ValueError: for a value other than run/pause/stop.
    """
    if value not in CONTROL_VALUES:
        raise ValueError(f"control must be one of {CONTROL_VALUES}, got {value!r}")
    r.set(keys.control, value)


def write_config(r: redis.Redis, keys: Keys, text: str) -> None:
    """Store the run's resolved config (JSON text) under ``config``."""
    r.set(keys.config, text)


def read_config(r: redis.Redis, keys: Keys) -> str | None:
    """The stored config text, or None."""
    v = r.get(keys.config)
    return None if v is None else _s(v)


def read_accounting(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The ``accounting`` hash as ints, every field of ``ACCOUNTING_FIELDS`` present (0 if unset)."""
    d = {f: 0 for f in ACCOUNTING_FIELDS}
    for k, v in r.hgetall(keys.accounting).items():
        try:
            d[_s(k)] = int(v)
        except ValueError:
            pass
    return d


def stream_info(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Experience stream state.

    Returns:
        ``length`` (XLEN), ``backlog`` (= length: acknowledged entries are deleted, so this is the
        unacknowledged count that admission uses), ``pending`` (delivered, not acknowledged),
        ``lag`` (XINFO GROUPS lag, never delivered; None when Redis reports nil after XDEL —
        then ``length - pending`` is the estimate in ``undelivered``), ``undelivered``,
        ``consumers``, ``deadletter`` (XLEN of the deadletter stream).
    """
    pipe = r.pipeline(transaction=False)
    pipe.xlen(keys.experience)
    pipe.xlen(keys.deadletter)
    length, dead = pipe.execute()
    pending = 0
    lag = None
    consumers = 0
    try:
        groups = r.xinfo_groups(keys.experience)
    except ResponseError:
        groups = []
    for gi in groups:
        g = {_s(k): v for k, v in gi.items()}
        if _s(g.get("name", "")) == keys.group:
            pending = int(g.get("pending") or 0)
            consumers = int(g.get("consumers") or 0)
            raw_lag = g.get("lag")
            lag = int(raw_lag) if raw_lag is not None else None
    undelivered = lag if lag is not None else max(0, int(length) - pending)
    return {"length": int(length), "backlog": int(length), "pending": pending, "lag": lag,
            "undelivered": undelivered, "consumers": consumers, "deadletter": int(dead)}
