"""The one retry policy of every Redis call: exponential backoff with jitter, for as long as it takes.

Every client made by :func:`keisei_stream.wire.client.connect` carries a
:class:`RetryForever`, so each command, pipeline, script call and pub/sub read of the worker, the
learner, the evaluator and ``keisei run`` waits out a Redis outage of any length instead of
raising. While calls are failing the process logs one line when the outage starts and one when it
ends, and :data:`OUTAGES` counts the outages and their seconds (processes report them in their
status hashes and metrics).

Backoff: ``min(cap, base * 2**failures)`` scaled by a uniform random factor in ``[0, 1]``
(redis-py's ``ExponentialWithJitterBackoff``; "full jitter" in M. Brooker, "Exponential Backoff
And Jitter", AWS Architecture Blog, 2015).

A process that must stop while Redis is down registers a check with :func:`set_stop_check`: once
it returns True the failing call raises its connection error instead of retrying again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

log = logging.getLogger("keisei.redis")

#: Errors of a lost or slow connection (never a command's own error): the client retries them, and
#: so do the producer and the weights watcher.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0


@dataclass
class OutageStats:
    """Process-wide record of Redis outages as seen by this process's calls.

    Attributes:
        outages: outages that ended (a call failed, then a call succeeded).
        outage_s: seconds spent in ended outages.
        since: ``time.monotonic()`` at which the current outage began; None when reachable.
    """

    outages: int = 0
    outage_s: float = 0.0
    since: float | None = None
    _failing: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, error: BaseException) -> None:
        with self._lock:
            self._failing += 1
            if self.since is None:
                self.since = time.monotonic()
                log.warning("Redis unreachable (%s: %s); retrying with backoff until it is back",
                            type(error).__name__, error)

    def end(self, reached: bool) -> None:
        """A failing call is over: ``reached`` the server, or gave up (stop requested)."""
        with self._lock:
            self._failing = max(0, self._failing - 1)
            if reached and self._failing == 0 and self.since is not None:
                seconds = time.monotonic() - self.since
                self.outages += 1
                self.outage_s += seconds
                self.since = None
                log.warning("Redis reachable again after %.1f s", seconds)

    def total_s(self) -> float:
        """Seconds of all outages, the current one included."""
        current = time.monotonic() - self.since if self.since is not None else 0.0
        return self.outage_s + current

    def fields(self) -> dict[str, Any]:
        """``redis_outages`` (count) and ``redis_outage_s`` (seconds) for status hashes and metrics."""
        return {"redis_outages": self.outages + (self.since is not None), "redis_outage_s": round(self.total_s(), 3)}


OUTAGES = OutageStats()
_stop_check: Callable[[], bool] | None = None


def set_stop_check(check: Callable[[], bool] | None) -> None:
    """Make failing calls give up (raise) once ``check()`` is True; None retries forever again."""
    global _stop_check
    _stop_check = check


class RetryForever(Retry):
    """redis-py ``Retry`` that never gives up on :data:`TRANSIENT_ERRORS` (see the module docstring).

    Args:
        base: first backoff in seconds. cap: longest backoff in seconds.
    """

    def __init__(self, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S):
        super().__init__(ExponentialWithJitterBackoff(cap=cap, base=base), -1, supported_errors=TRANSIENT_ERRORS)

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> Any:
        failed = False

        def on_failure(error: Exception, failures: int) -> None:
            nonlocal failed
            if not failed:
                failed = True
                OUTAGES.begin(error)
            if with_failure_count:
                fail(error, failures)
            else:
                fail(error)
            if _stop_check is not None and _stop_check():
                raise error

        reached = False
        try:
            result = super().call_with_retry(do, on_failure, is_retryable, with_failure_count=True)
            reached = True
            return result
        except TRANSIENT_ERRORS:
            raise  # gave up (a stop was requested): the server was not reached
        except Exception:
            reached = True  # the server answered, with an error of the command's own (e.g. NOGROUP)
            raise
        finally:
            if failed:
                OUTAGES.end(reached)


class StopFlag:
    """Set by SIGTERM/SIGINT (installed by the constructor, in the main thread); checked by a
    process between its steps, and by the retry policy so that a stop during an outage ends the
    wait (the failing call then raises one of :data:`TRANSIENT_ERRORS`)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)
        set_stop_check(lambda: self.requested)

    def __call__(self, signum, frame) -> None:  # signal handler
        self.requested = True


def is_oom(error: BaseException) -> bool:
    """True for the server's refusal to write because it reached ``maxmemory`` (``OOM ...``),
    also when it comes wrapped in a script error."""
    return isinstance(error, OutOfMemoryError) or (isinstance(error, ResponseError) and "OOM" in str(error))


def is_busy(error: BaseException) -> bool:
    """True for a server busy running a script past its time limit (``BUSY ...``, also inside a
    pipeline's annotated error; not ``BUSYGROUP``/``BUSYKEY``, which are a command's own errors):
    it answers nothing else until the script ends or is killed."""
    if not isinstance(error, ResponseError):
        return False
    text = str(error)
    return getattr(error, "status_code", None) == "BUSY" or text.startswith("BUSY ") or " error: BUSY " in text


def best_effort(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a Redis write that may be skipped while the server is full: status hashes, heartbeats,
    capped streams. An ``OOM`` refusal is logged (``what`` names the write) and None returned;
    every other error is raised."""
    try:
        result = fn(*args, **kwargs)
    except ResponseError as exc:
        if not is_oom(exc):
            raise
        if what not in _skipping:  # one line when skipping starts, one when it ends
            _skipping.add(what)
            log.warning("Redis is full (%s): %s skipped until it has room", exc, what)
        return None
    if what in _skipping:
        _skipping.discard(what)
        log.warning("Redis has room again: %s written", what)
    return result


_skipping: set[str] = set()

#: Backoff of :func:`wait_for_room` (seconds): 50 ms doubling up to 2 s.
ROOM_BASE_S, ROOM_CAP_S = 0.05, 2.0


def wait_for_room(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a Redis write a process cannot start without (creating the consumer group, the run's
    epoch, its config), waiting while the server refuses it for lack of memory: backpressure, as
    for the workers' adds, instead of exiting. One log line when the wait starts (``what`` names
    the write) and one when it ends; backoff 50 ms doubling to 2 s. A stop requested meanwhile
    (:func:`set_stop_check`) ends the wait by raising the ``OOM`` error.

    Raises:
        Exception: every error of ``fn`` but an ``OOM`` refusal (and that one after a stop request).
    """
    delay, since = ROOM_BASE_S, None
    while True:
        try:
            result = fn(*args, **kwargs)
        except ResponseError as exc:
            if not is_oom(exc) or (_stop_check is not None and _stop_check()):
                raise
            if since is None:
                since = time.monotonic()
                log.warning("Redis is full (%s): %s waits until it has room (backpressure)", exc, what)
            time.sleep(delay)
            delay = min(delay * 2, ROOM_CAP_S)
            continue
        if since is not None:
            log.warning("Redis has room again after %.1f s: %s done", time.monotonic() - since, what)
        return result
