"""A worker's producer: adds its experience batches to its own stream, exactly once, within its credit.

Every worker writes its own experience stream ``experience:{id}`` and its own producer record
``producers:{id}`` and nothing else (:mod:`keisei_stream.ops.acl`: no scripting, every write an
``XADD``). A batch goes in with one ``MULTI/EXEC`` of two ``XADD`` s: the entry, and the record
with its new totals. Before it, the worker ``WATCH`` es its record and reads it: a record that
already names this producer's ``session`` and the batch's ``seq`` means an earlier attempt went
in (its reply was lost with the connection), so the batch is not added twice; a record changed
by anyone meanwhile aborts the ``EXEC`` and the attempt is made again on what is there now.
redis-py turns a connection lost while watching into a ``WatchError`` instead of sending the
transaction again blindly, so a retry always reads the record first.

**Credit (backpressure).** The learner publishes, per worker, how many entries it may hold
unacknowledged in its stream (the ``credit`` hash, :mod:`keisei_stream.wire.consumer`); the
learner deletes (``XDEL``) every entry it settles, so ``XLEN experience:{id}`` is exactly what the
worker holds there. The producer adds only while ``XLEN`` is below its credit (1 while none is
published), and otherwise waits with exponential backoff, keeping its games. Only the worker
itself adds to its stream, so this check needs no script. A worker that ignores its credit only
lengthens its own stream, which the learner reads no further than the credit (counted as
overruns). ``MAXLEN`` is never used on a stream.

**An add the stream refuses.** Commands in ``MULTI/EXEC`` all run even when one fails, so an
``XADD`` refused at run time (a stream whose ids its worker's credential exhausted by adding the
largest id) leaves the record counting a batch that is not there: the producer writes the record
back at once, counts the refusal (``refused``) and waits as for a full stream, keeping the batch
(the learner resets such a stream once it has read it empty). A server at ``maxmemory`` refuses
the whole transaction (``OOM``): the producer waits for room (``oom_waits``).

The record (:data:`keisei_stream.wire.keys.PRODUCER_FIELDS`): ``session``, ``seq``, ``positions``
and ``batches`` (added in all, by every session of this worker id, as the server holds them),
``discarded`` (positions of games dropped at stops, :meth:`Producer.record_discarded`),
``lost_positions`` and ``lost_batches`` (below) with ``lost_reason``;
:func:`keisei_stream.wire.status.read_producers` reads them.

**Adds a failover lost.** A primary acknowledges an add before its replica holds it; killed in
that window, the replica it promotes (a Sentinel failover; or a server restarted from its files)
holds the run's writes up to some point before, the record and the entries alike (replication
applies each ``MULTI/EXEC`` whole and in order). The producer remembers the record it last wrote;
whenever it reads the record again (each add, a discard count, :meth:`Producer.reconcile` after
an outage) and finds it behind, with the run's ``epoch`` unchanged (a server that lost the whole
run has a new epoch: the learner records that loss), the difference is what the old primary
acknowledged and never replicated: it is added to the record's ``lost_positions`` and
``lost_batches``, with ``lost_reason``, in the same transaction as the add (or on its own). So
after a failover, per worker and in all: the positions the workers were told were added =
``positions + lost_positions``, and ``positions`` (what the server holds) still balances with
what the learner settled.

Takes a ``redis.Redis`` made by :func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import redis
from redis.exceptions import WatchError

from keisei_stream.experience import ExperienceBatch

from .atomic import EpochWatch
from .client import as_str
from .codec import encode_batch
from .keys import Keys
from .retry import TRANSIENT_ERRORS, is_oom

#: Credit of a worker while the learner has published none (after a restart that lost the data).
DEFAULT_CREDIT = 1


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


def _read_record(r: Any, key: str) -> dict[str, str]:
    """The worker's record (``XREVRANGE key + - COUNT 1``) as strings; zeros when there is none."""
    rec = {"session": "", "seq": "-1", "positions": "0", "batches": "0", "discarded": "0", "discard_seq": "",
           "lost_positions": "0", "lost_batches": "0", "lost_reason": ""}
    last = r.xrevrange(key, count=1)
    if last:
        rec.update({as_str(k): as_str(v) for k, v in last[0][1].items() if as_str(k) in rec})
    return rec


def _int(rec: dict[str, str], name: str) -> int:
    try:
        return int(rec[name])
    except (KeyError, ValueError):
        return 0


def _acknowledged(rec: dict[str, str], name: str) -> int:
    """``positions`` or ``batches`` the worker was told were added: those the record holds plus
    those a failover lost (``lost_{name}``)."""
    return _int(rec, name) + _int(rec, f"lost_{name}")


class Producer:
    """Adds a worker's experience batches to its own stream within its credit (one per worker process).

    Args:
        r: client (``decode_responses=False``).
        keys: the run's keys.
        worker_id: this worker's id (field ``w``; its stream ``experience:{worker_id}``, its record
            ``producers:{worker_id}``).
        backoff_max_s: cap of the exponential wait (starts at 10 ms, doubles).
        credit: entries this producer may hold unacknowledged in its stream; None: the learner's
            published credit (``credit`` hash, :data:`DEFAULT_CREDIT` while there is none).
        epoch: the run's epoch as this process knows it (the worker's
            :class:`~keisei_stream.wire.atomic.EpochWatch`, which the worker updates after a
            restart that lost the run's data); None: one of its own, read at the first add. It
            tells a failover's lost adds (epoch unchanged: counted) from a lost run (not counted
            here).

    Attributes:
        waited_s: total seconds spent waiting for credit, room or the server.
        session: random id of this producer instance; batch ids are ``{worker}:{session}:{seq}``.
        seq: sequence number of the next batch.
        full_waits, oom_waits, refused, retries: waits for credit, for memory, adds the stream
            refused, attempts made again after a lost connection or a changed record.
        lost_positions, lost_batches: what this process found lost in failovers (module doc).
    """

    def __init__(self, r: redis.Redis, keys: Keys, worker_id: str, backoff_max_s: float = 2.0,
                 credit: int | None = None, epoch: EpochWatch | None = None):
        if credit is not None and credit < 1:
            raise ValueError("credit must be >= 1")
        self.r = r
        self.keys = keys
        self.worker_id = worker_id
        self.stream = keys.experience(worker_id)
        self.record_key = keys.producer(worker_id)
        self.credit = credit
        self.backoff_max_s = float(backoff_max_s)
        self.session = uuid.uuid4().hex[:12]
        self.seq = 0
        self.waited_s = 0.0
        self.full_waits = 0
        self.oom_waits = 0
        self.refused = 0
        self.retries = 0
        self.last_credit = credit or DEFAULT_CREDIT
        self.epoch = epoch if epoch is not None else EpochWatch()
        self.lost_positions = 0
        self.lost_batches = 0
        self._discards = 0
        self._written: dict[str, str] | None = None  # the record as this producer last wrote (or found) it

    def next_batch_id(self) -> str:
        """The id the next sent batch gets."""
        return f"{self.worker_id}:{self.session}:{self.seq}"

    def room(self) -> bool:
        """Whether this worker's stream holds fewer entries than its credit (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(self.stream)
        if self.credit is None:
            pipe.hget(self.keys.credit, self.worker_id)
        res = pipe.execute(raise_on_error=False)
        if self.credit is None:
            try:
                self.last_credit = max(1, int(res[1])) if res[1] is not None else DEFAULT_CREDIT
            except (TypeError, ValueError):  # not a number (or the key is not a hash): the default
                self.last_credit = DEFAULT_CREDIT
        if isinstance(res[0], Exception):
            raise res[0]
        return int(res[0]) < self.last_credit

    def send(self, batch: ExperienceBatch, should_stop: Callable[[], bool] | None = None,
             on_wait: Callable[[float], None] | None = None) -> bool:
        """Add ``batch`` (its ``batch_id`` and ``worker_id`` are set here) to this worker's stream.

        Tries once, then waits while the stream holds its credit, the server is full (``OOM``,
        counted in ``oom_waits``) or the stream refuses the add (``refused``), and retries after
        connection errors and changed records, with exponential backoff (10 ms doubling up to
        ``backoff_max_s``), calling ``should_stop()`` before and at least every 50 ms during each
        wait and ``on_wait(seconds)`` after it.

        Returns:
            True once the batch is in the stream (exactly once, even across retries);
            False when ``should_stop()`` said stop before it got in: the batch was not added (or, if a
            connection broke after the server added it, a later ``send`` of the same batch
            is recognised and not added twice), the caller keeps it.

        Raises:
            redis.ResponseError: any other refusal of the server (e.g. ``NOPERM``).
        """
        batch.batch_id = self.next_batch_id()
        batch.worker_id = self.worker_id
        fields = encode_batch(batch)
        delay = 0.01
        while True:
            try:
                status = self._try_add(fields, batch.num_positions)
            except (*TRANSIENT_ERRORS, WatchError):
                self.retries += 1
                status = "retry"
            except redis.ResponseError as exc:
                if not is_oom(exc):
                    raise
                self.oom_waits += 1  # Redis is full: backpressure until the learner frees memory
                status = "retry"
            if status == "added":
                self.seq += 1
                return True
            if status == "full":
                self.full_waits += 1
            if should_stop is not None and should_stop():
                return False
            t0 = time.monotonic()
            stopped = _sleep_interruptible(delay, should_stop)
            waited = time.monotonic() - t0
            self.waited_s += waited
            if on_wait is not None:
                on_wait(waited)
            if stopped:
                return False
            delay = min(delay * 2, self.backoff_max_s)

    def _try_add(self, fields: dict[str, Any], positions: int) -> str:
        """One attempt: ``added`` (now or by an earlier attempt), ``full`` (no credit left) or
        ``refused`` (the stream refused the entry; the record is written back)."""
        if not self.room():
            return "full"
        if self.epoch.epoch is None:  # a producer of its own: the run's epoch at its first add
            raw = self.r.get(self.keys.epoch)
            self.epoch.epoch = None if raw is None else as_str(raw)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(self.record_key)
            rec, lost_p, lost_b = self._checked(pipe, _read_record(pipe, self.record_key))
            if rec["session"] == self.session and _int(rec, "seq") >= self.seq:
                self._written = rec  # (not behind: it holds this producer's newest batch)
                return "added"  # an earlier attempt went in; its reply was lost
            new = {**rec, "session": self.session, "seq": str(self.seq),
                   "positions": str(_int(rec, "positions") + int(positions)), "batches": str(_int(rec, "batches") + 1)}
            pipe.multi()
            pipe.xadd(self.stream, fields)
            pipe.xadd(self.record_key, new, maxlen=1, approximate=False)
            added, _record = pipe.execute(raise_on_error=False)
        if isinstance(added, Exception):  # refused at run time; the record went in: write it back
            self.r.xadd(self.record_key, rec, maxlen=1, approximate=False)
            self._written = rec
            self._count_lost(lost_p, lost_b)
            self.refused += 1
            return "refused"
        self._written = new
        self._count_lost(lost_p, lost_b)
        return "added"

    def _checked(self, pipe: Any, rec: dict[str, str]) -> tuple[dict[str, str], int, int]:
        """``(record, positions, batches)``: ``rec`` (just read under ``WATCH``) with a failover's
        lost adds counted in it, and how many, when it is behind the record this producer last
        wrote (what was acknowledged, ``positions + lost_positions`` and ``batches +
        lost_batches``, is less) and the run's epoch is unchanged (module doc); the caller writes
        it (the ``EXEC`` fails if the record changed meanwhile). Behind with another epoch (the
        run's data lost: the learner records it), or nothing written yet: ``rec`` unchanged."""
        last = self._written
        if last is None:
            return rec, 0, 0
        positions = _acknowledged(last, "positions") - _acknowledged(rec, "positions")
        batches = _acknowledged(last, "batches") - _acknowledged(rec, "batches")
        if positions <= 0 and batches <= 0 and _int(rec, "discarded") >= _int(last, "discarded"):
            return rec, 0, 0
        found = pipe.get(self.keys.epoch)
        if found is None or as_str(found) != self.epoch.epoch:
            return rec, 0, 0
        positions, batches = max(0, positions), max(0, batches)
        out = {**rec, "discarded": str(max(_int(rec, "discarded"), _int(last, "discarded")))}  # a count: kept
        if positions or batches:
            out.update({"lost_positions": str(_int(rec, "lost_positions") + positions),
                        "lost_batches": str(_int(rec, "lost_batches") + batches),
                        "lost_reason": f"{time.strftime('%Y-%m-%d %H:%M:%S')}: the server held this worker's record at "
                        f"{_int(rec, 'batches')} batches / {_int(rec, 'positions')} positions, {batches} / {positions} "
                        f"fewer than it had acknowledged (up to batch {last['seq']} of session {last['session']}), "
                        "with the run's epoch unchanged: a failover (or a restart from its files) lost adds that were "
                        "never replicated"})
        return out, positions, batches

    def _count_lost(self, positions: int, batches: int) -> None:
        """Count a failover's lost adds once their record is written."""
        self.lost_positions += positions
        self.lost_batches += batches

    def reconcile(self) -> int:
        """After an outage with the run's epoch intact (the worker's
        :class:`~keisei_stream.wire.atomic.EpochWatch` looked and found it unchanged): read the
        record and, when it is behind what this producer wrote, count the lost adds in it now
        (module doc) rather than at the next add. Returns the positions found lost (0: none).
        Raises the client's errors (an ``OOM`` refusal included)."""
        while True:
            try:
                with self.r.pipeline(transaction=True) as pipe:
                    pipe.watch(self.record_key)
                    rec, positions, batches = self._checked(pipe, _read_record(pipe, self.record_key))
                    if not positions and not batches:
                        return 0
                    pipe.multi()
                    pipe.xadd(self.record_key, rec, maxlen=1, approximate=False)
                    pipe.execute()
                self._written = rec
                self._count_lost(positions, batches)
                return positions
            except WatchError:
                continue

    def record_discarded(self, positions: int) -> int:
        """Add ``positions`` (of games dropped at a stop) to this worker's record; returns its new
        ``discarded`` total. Raises the client's errors (an ``OOM`` refusal included).

        Exactly once like :meth:`send`: the record written names this session and a
        ``discard_seq`` of its own (-1 - the number of discards), so a retry after a lost reply
        sees it went in."""
        marker = str(-2 - self._discards)
        while True:
            try:
                with self.r.pipeline(transaction=True) as pipe:
                    pipe.watch(self.record_key)
                    rec, lost_p, lost_b = self._checked(pipe, _read_record(pipe, self.record_key))
                    if rec["session"] == self.session and rec.get("discard_seq") == marker:
                        lost_p = lost_b = 0
                        break  # an earlier attempt went in
                    rec.update({"session": self.session, "discard_seq": marker,
                                "discarded": str(_int(rec, "discarded") + int(positions))})
                    pipe.multi()
                    pipe.xadd(self.record_key, rec, maxlen=1, approximate=False)
                    pipe.execute()
                break
            except WatchError:
                continue
        self._written = rec
        self._count_lost(lost_p, lost_b)
        self._discards += 1
        return _int(rec, "discarded")
