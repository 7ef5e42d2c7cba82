"""The experience stream's producer: admission under the backlog limit, exactly once.

One Lua script checks the backlog, makes the add idempotent, adds the entry (``XADD``) and
updates the worker's own producer record, all atomically. The backlog is ``XLEN experience``:
the learner deletes (``XDEL``) every entry it acknowledges, so the stream holds exactly the
unacknowledged entries (delivered-but-pending plus never-delivered).
``MAXLEN`` is never used on this stream. A full stream makes the producer wait with exponential
backoff (it keeps its games); a lost connection makes it retry. A retry of a script call that
did run is recognised by the worker's record (``producers:{id}``: its last ``session`` and
``seq``) and not added twice.

The record is a stream holding one entry (``XADD ... MAXLEN 1``): every write a worker makes is
an ``XADD``, which is what lets its Redis user be that narrow on every supported server
(:mod:`keisei_stream.ops.acl`). Its fields (:data:`keisei_stream.wire.keys.PRODUCER_FIELDS`):
``session``, ``seq``, ``positions`` and ``batches`` (added in all, by every session of this
worker id), ``discarded`` (positions of games dropped at stops, :meth:`Producer.record_discarded`);
:func:`keisei_stream.wire.status.read_producers` reads them.

Takes a ``redis.Redis`` made by :func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import redis

from keisei_stream.experience import ExperienceBatch

from .codec import encode_batch
from .retry import TRANSIENT_ERRORS, is_oom
from .keys import Keys

# Reads the record of KEYS[2] into `rec`; shared by both scripts.
_READ_RECORD = """
local rec = {session = '', seq = '-1', positions = '0', batches = '0', discarded = '0'}
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if last[1] then
  local f = last[1][2]
  for i = 1, #f, 2 do rec[f[i]] = f[i + 1] end
end
"""
_WRITE_RECORD = """
redis.call('XADD', KEYS[2], 'MAXLEN', '1', '*', 'session', rec.session, 'seq', rec.seq,
           'positions', rec.positions, 'batches', rec.batches, 'discarded', rec.discarded)
"""

# KEYS: experience, producers:{id}
# ARGV: max_backlog, session, seq, positions, then field/value pairs for XADD
# Returns {1, id} added, {2, ""} already added (a retry), {0, xlen} stream full.
_ADMIT_LUA = _READ_RECORD + """
if rec.session == ARGV[2] and tonumber(rec.seq) >= tonumber(ARGV[3]) then
  return {2, ''}
end
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[1]) then
  return {0, len}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
rec.session, rec.seq = ARGV[2], ARGV[3]
rec.positions = string.format('%d', tonumber(rec.positions) + tonumber(ARGV[4]))
rec.batches = string.format('%d', tonumber(rec.batches) + 1)
""" + _WRITE_RECORD + """
return {1, id}
"""

# KEYS: (unused), producers:{id}; ARGV: positions discarded
_DISCARD_LUA = _READ_RECORD + """
rec.discarded = string.format('%d', tonumber(rec.discarded) + tonumber(ARGV[1]))
""" + _WRITE_RECORD + """
return rec.discarded
"""


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


class Producer:
    """Adds experience batches under the backlog limit (one per worker process).

    Args:
        r: client (``decode_responses=False``).
        keys: the run's keys.
        worker_id: this worker's id (field ``w``; its record is ``producers:{worker_id}``).
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
        self.oom_waits = 0
        self.retries = 0
        self._script = r.register_script(_ADMIT_LUA)
        self._discard = r.register_script(_DISCARD_LUA)

    def next_batch_id(self) -> str:
        """The id the next sent batch gets."""
        return f"{self.worker_id}:{self.session}:{self.seq}"

    def send(self, batch: ExperienceBatch, should_stop: Callable[[], bool] | None = None,
             on_wait: Callable[[float], None] | None = None) -> bool:
        """Add ``batch`` (its ``batch_id`` and ``worker_id`` are set here) to the stream.

        Tries once, then waits while the stream is full (XLEN >= max_backlog) or the server is
        (``OOM``: counted in ``oom_waits``), and retries after connection errors, with exponential
        backoff (10 ms doubling up to ``backoff_max_s``), calling ``should_stop()`` before and at
        least every 50 ms during each wait and ``on_wait(seconds)`` after it.

        Returns:
            True once the batch is in the stream (exactly once, even across retries);
            False when ``should_stop()`` said stop before it got in: the batch was not added (or, if a
            connection broke after the server added it, a later ``send`` of the same batch
            is recognised and not added twice), the caller keeps it.
        """
        batch.batch_id = self.next_batch_id()
        batch.worker_id = self.worker_id
        fields = encode_batch(batch)
        argv: list[Any] = [self.max_backlog, self.session, self.seq, batch.num_positions]
        for k, v in fields.items():
            argv += [k, v]
        delay = 0.01
        while True:
            try:
                status, _ = self._script(keys=[self.keys.experience, self.keys.producer(self.worker_id)], args=argv)
            except TRANSIENT_ERRORS:
                self.retries += 1
                status = -1
            except redis.ResponseError as exc:
                if not is_oom(exc):
                    raise
                self.oom_waits += 1  # Redis is full: backpressure until the learner frees memory
                status = -1
            if int(status) in (1, 2):
                self.seq += 1
                return True
            if int(status) == 0:
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

    def record_discarded(self, positions: int) -> int:
        """Add ``positions`` (of games dropped at a stop) to this worker's record; returns its new
        ``discarded`` total. Raises the client's errors (an ``OOM`` refusal included)."""
        return int(self._discard(keys=[self.keys.experience, self.keys.producer(self.worker_id)],
                                 args=[int(positions)]))

