"""Supervision of a local run's processes: start the learner and the workers as children, watch
them, restart what exits unexpectedly (with backoff), stop them in order.

Used by ``keisei run`` (:mod:`keisei_stream.cli.run`) and ``benchmarks/chaos.py``. Plain
functions over two small dataclasses: a :class:`Child` is one supervised process (its command,
environment, log and restart state); a :class:`Supervisor` holds the learner, the workers and
the private Redis (:class:`keisei_stream.ops.local.RunRedis`, or None with ``--redis``).

Restarts: a worker that exits while the run is not stopping (and ``control`` is not ``stop``) is
started again after ``min(cap, base * 2**(n - 1))`` seconds, ``n`` counting its exits that came
less than ``reset_after_s`` after its start (a worker that ran longer starts again after
``base``): exponential backoff without jitter (the children of one machine do not stampede a
server), as in M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015.
Each restart is counted in the run's ``supervisor`` hash (:func:`keisei_stream.wire.status.count_restart`),
which ``keisei status`` shows. The supervisor's own Redis calls are bounded (its client gives up
after a few seconds, see :func:`supervisor_client`): it must go on watching, and restart the
private Redis, while that server is stopped or gone; counts that could not be written yet are
written at a later round. A single learner that exits with an error is restarted with
``--resume`` the same way, at most ``learner_restarts`` times (several ranks under torchrun
restart themselves). A private Redis that dies is started again on its directory: it loads its
append-only file, and the run's users are created again with the same passwords.

A child that exits with :data:`~keisei_stream.config.EXIT_CONFIG` stopped on a configuration
error (a device torch cannot use, a stored config it cannot play by): restarting it cannot help,
so the run ends at once with that child's message (:attr:`Supervisor.fatal`).

Never imports torch.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from keisei_stream.config import EXIT_CONFIG
from keisei_stream.ops import embedded_redis
from keisei_stream.wire import client, retry, status
from keisei_stream.wire.keys import Keys

log = logging.getLogger("keisei.run")

#: Seconds the workers get to stop on ``control=stop`` before SIGTERM (then 10 s more, then SIGKILL).
WORKER_STOP_S = 30.0


def supervisor_client(url: str) -> redis.Redis:
    """A client whose calls give up after about 10 s (3 retries, 5 s socket timeout) instead of
    waiting out an outage like the run's processes do: the supervisor must keep watching."""
    return client.connect(url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 3),
                          socket_timeout=5.0, socket_connect_timeout=2.0)


#: What a bounded Redis call of the supervisor may raise when the server is stopped or gone.
REDIS_DOWN = (*retry.TRANSIENT_ERRORS, redis.exceptions.BusyLoadingError, redis.exceptions.AuthenticationError)


@dataclass
class Backoff:
    """Restart delays: ``min(cap_s, base_s * 2**(quick - 1))`` for the ``quick``-th exit in a row
    that came less than ``reset_after_s`` after its start."""

    base_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, quick_exits: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** max(0, quick_exits - 1))


@dataclass
class Child:
    """One supervised process. ``name``: ``learner`` or the worker id; ``resume_cmd``: the
    command of a restart (the learner's with ``--resume``), default ``cmd``."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    resume_cmd: list[str] | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    restart_at: float | None = None  # monotonic time of a pending restart
    exit_codes: list[int] = field(default_factory=list)

    def start(self, restart: bool = False) -> None:
        """Start the process (appending to its log) in its own session (a terminal's Ctrl-C reaches
        only the supervisor, which stops the children in order), SIGTERM to it if the supervisor
        dies (:func:`~keisei_stream.ops.embedded_redis.set_pdeathsig`)."""
        cmd = (self.resume_cmd or self.cmd) if restart else self.cmd
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, preexec_fn=embedded_redis.set_pdeathsig)
        self.started_at = time.monotonic()
        self.restart_at = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None


@dataclass
class Supervisor:
    """The processes of one local run.

    Attributes:
        r: a client of the run's Redis (the admin's for a private one); keys: the run's keys.
        learner, workers: the children. redis: the private server's handle (None with ``--redis``).
        evaluator: the continuous evaluation (``keisei run --eval``), supervised like a worker.
        backoff: restart delays. learner_restarts: restarts left for the learner (single rank).
        stopping: set once the stop began (nothing is restarted any more).
    """

    r: Any
    keys: Keys
    learner: Child
    workers: list[Child]
    redis: Any = None
    backoff: Backoff = field(default_factory=Backoff)
    learner_restarts: int = 0
    stopping: bool = False
    say: Callable[[str], None] = print
    unreported: list[str] = field(default_factory=list)  # restarts not yet counted in Redis
    evaluator: Child | None = None
    fatal: str | None = None  # a child's configuration error, which ended the run

    def children(self) -> list[Child]:
        return [self.learner, *self.controlled()]

    def controlled(self) -> list[Child]:
        """The children that ``control=stop`` stops (and that are restarted while it is not
        ``stop``): the workers, and the evaluator when there is one."""
        return [*self.workers, *([self.evaluator] if self.evaluator is not None else [])]

    def start(self) -> None:
        """Start the learner, then the workers (and the evaluator)."""
        self.learner.start()
        for w in self.controlled():
            w.start()

    def worker_restarts(self) -> int:
        return sum(w.restarts for w in self.workers)


def check_redis(sup: Supervisor) -> None:
    """Start the private Redis again when its process has exited (it loads its append-only
    file; the users come back with their passwords). Nothing to do with ``--redis``."""
    if sup.redis is None or sup.redis.alive():
        return
    sup.say(f"the private Redis exited ({sup.redis.returncode()}); starting it again from its append-only file")
    sup.redis.restart()
    sup.unreported.append("redis")


def _unavailable(exc: BaseException) -> bool:
    """The supervisor's Redis call failed because the server is stopped, gone, full (``OOM``) or
    busy with a script (``BUSY``): try again later, never end the run for it."""
    return isinstance(exc, REDIS_DOWN) or retry.is_oom(exc) or retry.is_busy(exc)


def _control(sup: Supervisor) -> str:
    try:
        return status.get_control(sup.r, sup.keys)
    except redis.RedisError as exc:
        if not _unavailable(exc):
            raise
        return "run"


def report_restarts(sup: Supervisor) -> None:
    """Count the restarts not yet counted in the ``supervisor`` hash (kept for later while Redis
    does not answer)."""
    while sup.unreported:
        try:
            status.count_restart(sup.r, sup.keys, sup.unreported[0])
        except redis.RedisError as exc:
            if not _unavailable(exc):
                raise
            return
        sup.unreported.pop(0)


def check_children(sup: Supervisor, now: float | None = None) -> str | None:
    """One round of supervision: the private Redis, then the learner, then the workers and the
    evaluator (one that exited while ``control`` is ``stop`` stopped on purpose and stays stopped). Returns a
    reason to end the run (the learner exited for good), else None."""
    now = time.monotonic() if now is None else now
    if sup.stopping:
        return None
    check_redis(sup)
    for child in sup.children():
        if child.restart_at is None and not child.running() and child.returncode == EXIT_CONFIG:
            sup.fatal = f"{child.name} stopped on a configuration error: {error_line(child.log_path)}"
            return sup.fatal
    lr = sup.learner
    if lr.restart_at is None and not lr.running():
        if lr.returncode == 0 or sup.learner_restarts <= 0:
            return f"the learner exited with {lr.returncode}"
        _schedule(sup, lr, now)
        sup.learner_restarts -= 1
    for child in sup.controlled():
        if child.restart_at is None and not child.running() and _control(sup) != "stop":
            _schedule(sup, child, now)
    for child in sup.children():
        if child.restart_at is not None and now >= child.restart_at:
            child.start(restart=True)
            sup.say(f"{child.name} restarted (restart {child.restarts}, pid {child.pid})")
    report_restarts(sup)
    return None


def error_line(log_path: Path, tail_bytes: int = 8192) -> str:
    """The last ``error:`` line of a child's log (else its last line): what it said when it stopped."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - tail_bytes))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError as exc:
        return f"(its log {log_path} is unreadable: {exc})"
    errors = [ln[len("error:"):].strip() for ln in lines if ln.startswith("error:")]
    return (errors or lines or [f"(nothing in {log_path})"])[-1]


def _schedule(sup: Supervisor, child: Child, now: float) -> None:
    """Note ``child``'s exit and when it starts again."""
    code = child.returncode
    child.exit_codes.append(code if code is not None else -1)
    ran = now - child.started_at
    child.quick_exits = child.quick_exits + 1 if ran < sup.backoff.reset_after_s else 1
    delay = sup.backoff.delay(child.quick_exits)
    child.restart_at = now + delay
    child.restarts += 1
    sup.unreported.append(child.name)
    sup.say(f"{child.name} exited with {code} after {ran:.0f} s; restarting in {delay:.0f} s (log: {child.log_path})")


def watch(sup: Supervisor, duration_s: float | None, on_tick: Callable[[], None] | None = None,
          tick_s: float = 2.0) -> str:
    """Supervise until ``duration_s`` seconds have passed, the learner exits for good, or a
    ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM turned into one by the caller); calls ``on_tick``
    every ``tick_s`` seconds. Returns why it ended."""
    t0 = time.monotonic()
    try:
        while True:
            if duration_s and time.monotonic() - t0 >= duration_s:
                return "duration reached"
            why = check_children(sup)
            if why:
                return why
            time.sleep(tick_s)
            if on_tick is not None:
                try:
                    on_tick()
                except redis.RedisError as exc:  # the view waits; supervision goes on
                    if not _unavailable(exc):
                        raise
                    sup.say(f"status unavailable ({type(exc).__name__}: {str(exc)[:60]}); Redis is stopped, "
                            "restarting, full or busy")
    except KeyboardInterrupt:
        return "interrupted"


def _terminate(p: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM to ``p``, up to ``timeout`` seconds for it to exit, then SIGKILL; True when killed."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return True


def stop_in_order(sup: Supervisor, learner_stop_timeout: float, worker_stop_s: float = WORKER_STOP_S) -> None:
    """``control=stop`` (every worker sends what it can and exits), then SIGTERM to the learner
    (it drains the stream into its last updates, acknowledges, checkpoints and exits);
    SIGTERM/SIGKILL whatever does not stop in time. A private Redis that died just before is
    started again first: the learner needs it to acknowledge what it trains last."""
    sup.stopping = True
    check_redis(sup)
    control_set = False
    for attempt in range(5):
        try:
            status.set_control(sup.r, sup.keys, "stop")
            control_set = True
            break
        except redis.RedisError as exc:  # stopped, restarting, full or busy: try again, then rely on signals
            if not _unavailable(exc):
                raise
            if attempt == 4:
                sup.say(f"could not set control=stop ({exc}); the workers get SIGTERM")
            time.sleep(1.0)
    # workers that cannot read control=stop are not waited for
    deadline = time.monotonic() + (worker_stop_s if control_set else 0.0)
    for w in sup.controlled():  # a worker stops at its next step; SIGTERM, then SIGKILL, if it does not
        if w.proc is None:
            continue
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _terminate(w.proc, 10.0)
    lp = sup.learner.proc
    if lp is not None and _terminate(lp, learner_stop_timeout):
        sup.say("the learner did not stop in time; killed")
    report_restarts(sup)
