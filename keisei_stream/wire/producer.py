"""The experience stream's producer: admission under the backlog limit, exactly once.

One Lua script checks the backlog, makes the add idempotent and adds the entry (``XADD``), all
atomically. The backlog is ``XLEN experience``: the learner deletes (``XDEL``) every entry it
acknowledges, so the stream holds exactly the unacknowledged entries (delivered-but-pending plus
never-delivered).
``MAXLEN`` is never used on this stream. A full stream makes the producer wait with exponential
backoff (it keeps its games); a lost connection makes it retry. A retry of a script call that
did run is recognised by the ``producers`` hash (``worker -> "session:seq"``) and not added twice.

Takes a ``redis.Redis`` made by :func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import redis

from .codec import ExperienceBatch, encode_batch
from .retry import TRANSIENT_ERRORS, is_oom
from .keys import Keys

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
        self.oom_waits = 0
        self.retries = 0
        self._script = r.register_script(_ADMIT_LUA)

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
        argv: list[Any] = [self.max_backlog, self.worker_id, self.session, self.seq, batch.num_positions]
        for k, v in fields.items():
            argv += [k, v]
        delay = 0.01
        while True:
            try:
                status, _ = self._script(keys=[self.keys.experience, self.keys.accounting, self.keys.producers], args=argv)
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
