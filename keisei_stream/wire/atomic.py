"""Atomic groups of Redis writes that a full server cannot refuse and a restarted one cannot take.

The learner's acknowledgements (XACK + XDEL + counters) and its weights (blob + ``weights:latest``)
must land (1) all together, (2) even when the server is at ``maxmemory`` (acknowledging is how a
full server gets memory back, and the weights replace a blob pruned just before), and (3) only in
the server that holds the run's data: after a restart without persistence, counts meant for the
old server would corrupt the new one's accounting. :func:`run_atomic` runs them in one Lua script
that first checks the run's ``epoch`` key; when the server refuses for lack of memory it runs the
same script flagged ``allow-oom`` (Redis >= 7, https://redis.io/docs/latest/develop/interact/programmability/eval-intro/#script-flags),
or on Redis 6.2, which has no script flags, opened by a write that a full server never refuses
(see ``_ATOMIC_GATED_LUA``). The key ``oom-gate`` of the run is never written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import redis

from . import retry
from .client import as_str
from .keys import Keys
from .retry import is_oom, wait_for_room

log = logging.getLogger("keisei.redis")

# Runs the commands given in ARGV[2:] (each as: argument count, command, arguments...) atomically,
# but only while the run's epoch (KEYS[1]) is still ARGV[1] ('' = not checked): acknowledgements and
# counts meant for a server that lost the run's data must never land in the restarted one.
#
# One pseudo-command, ACK_COUNTED stream group accounting id trained stale suffix, acknowledges one
# entry and counts its positions (in the accounting fields named with ``suffix``, ":{worker}") only
# if that XACK acknowledged it (it was still pending): an entry that two learners both held (one
# stalled past claim_idle_ms, the other claimed it) is counted once, and the second
# acknowledgement only increments ``double_acks``.
_ATOMIC_BODY = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EPOCH the run epoch changed: the server lost the run data')
end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if ARGV[i + 1] == 'ACK_COUNTED' then
    local stream, group, acc, id, sfx = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 8]
    if redis.call('XACK', stream, group, id) == 1 then
      redis.call('XDEL', stream, id)
      redis.call('HINCRBY', acc, 'acked_entries' .. sfx, 1)
      redis.call('HINCRBY', acc, 'trained_positions' .. sfx, ARGV[i + 6])
      redis.call('HINCRBY', acc, 'stale_positions' .. sfx, ARGV[i + 7])
    else
      redis.call('HINCRBY', acc, 'double_acks' .. sfx, 1)
    end
  else
    redis.call(unpack(ARGV, i + 1, i + n))
  end
  i = i + n + 1
end
return 1
"""
# The same, allowed to run while the server is at maxmemory ("allow-oom", Redis >= 7):
# acknowledging and deleting entries is how a full server gets memory back.
_ATOMIC_ALLOW_OOM_LUA = "#!lua flags=allow-oom" + _ATOMIC_BODY
# Redis 6.2 has no script flags. There a script is refused for lack of memory only at its first
# write command, and only if that command may grow memory ("denyoom"); after a first write,
# nothing is refused (a script cannot stop half-way). So the same body opened by a DEL of a key
# that never exists (KEYS[2], a write that is never refused) runs whole on a full 6.2 server
# (Redis 6.2 src/scripting.c, luaRedisGenericCommand: the check applies while lua_write_dirty is 0).
_ATOMIC_GATED_LUA = "redis.call('DEL', KEYS[2])" + _ATOMIC_BODY


class EpochChanged(RuntimeError):
    """The server no longer holds the run's epoch: it restarted without the run's data."""


#: Longest ``WAIT`` (ms) while replicas fall short (:class:`ReplicationShortfalls`).
SHORT_WAIT_MS = 10


@dataclass
class ReplicationShortfalls:
    """Process-wide count of :func:`run_atomic` calls whose ``WAIT`` timed out before enough
    replicas held the writes (they were acknowledged by the primary alone: a failover in that
    window may lose them).

    After a shortfall the next ``WAIT`` s last at most :data:`SHORT_WAIT_MS` (``short``), until one
    is met again: with its replica gone (the standby promoted after a failover, before another
    replica joins) every ``WAIT`` would last its whole timeout and slow every acknowledgement and
    publication down for nothing. One line is logged when it starts and one when it ends."""

    count: int = 0
    short: bool = False


UNREPLICATED = ReplicationShortfalls()


def run_atomic(r: redis.Redis, keys: Keys, cmds: list[tuple], epoch: str | None,
               wait: tuple[int, int] | None = None) -> int | None:
    """Run ``cmds`` (tuples: command, arguments; or ``("ACK_COUNTED", stream, group, accounting,
    id, trained, stale, suffix)``, see above) atomically in one script, only while the run's
    ``epoch`` key still holds ``epoch`` (None: not checked); past ``maxmemory`` when the server is full.

    With ``wait = (replicas, ms)`` the script is followed, on the same connection, by ``WAIT
    replicas ms`` (https://redis.io/docs/latest/commands/wait/): the call returns once that many
    replicas hold the writes, or after ``ms`` milliseconds (a shortfall is logged and counted in
    :data:`UNREPLICATED`, not raised: the writes are done on the primary).

    Returns:
        The replicas that acknowledged the writes (``WAIT``'s answer), or None without ``wait``.

    Raises:
        EpochChanged: the server lost the run's data since ``epoch`` was read (nothing ran).
        redis.ResponseError: a command's own error.
    """
    argv: list[Any] = [epoch or ""]
    for c in cmds:
        argv += [len(c), *c]
    try:
        try:
            return _eval(r, wait, _ATOMIC_BODY, 1, keys.epoch, *argv)
        except redis.ResponseError as exc:
            if not is_oom(exc):
                raise
            try:
                return _eval(r, wait, _ATOMIC_ALLOW_OOM_LUA, 1, keys.epoch, *argv)
            except redis.ResponseError as again:
                if "EPOCH" in str(again) or is_oom(again):
                    raise
                # no script flags (Redis < 7): the same body behind a first write that is never refused
                return _eval(r, wait, _ATOMIC_GATED_LUA, 2, keys.epoch, keys.oom_gate, *argv)
    except redis.ResponseError as exc:
        if "EPOCH" in str(exc):
            raise EpochChanged(str(exc)) from None
        raise


def _eval(r: redis.Redis, wait: tuple[int, int] | None, script: str, numkeys: int, *args: Any) -> int | None:
    """``EVAL script``; with ``wait``, then ``WAIT`` in the same pipeline (one connection: ``WAIT``
    waits for the replication of the writes of the connection it is sent on)."""
    if not wait or wait[0] < 1:
        r.eval(script, numkeys, *args)
        return None
    u = UNREPLICATED
    ms = min(int(wait[1]), SHORT_WAIT_MS) if u.short else int(wait[1])
    pipe = r.pipeline(transaction=False)
    pipe.eval(script, numkeys, *args)
    pipe.execute_command("WAIT", int(wait[0]), ms)
    done, acked = pipe.execute(raise_on_error=False)
    for result in (done, acked):
        if isinstance(result, Exception):
            raise result
    if int(acked) < wait[0]:
        u.count += 1
        if not u.short:
            log.warning("only %d of %d replicas held a write of the run within %d ms (a failover now would lose it); "
                        "waiting at most %d ms a write until they hold one again", int(acked), wait[0], ms,
                        SHORT_WAIT_MS)
        u.short = True
    elif u.short:
        u.short = False
        log.warning("replicas hold the run's writes again (%d writes were acknowledged by the primary alone)", u.count)
    return int(acked)


def write_small(r: redis.Redis, keys: Keys, cmd: tuple, what: str) -> None:
    """One small write a process needs to start or to stop (the control key, the config, the
    run's epoch, a consumer group: bytes to a few KB), done even while the server is at
    ``maxmemory``: :func:`run_atomic` passes it (``allow-oom`` on Redis >= 7, behind the gate on
    6.2); should the server still refuse it for lack of memory, it waits for room
    (:func:`keisei_stream.wire.retry.wait_for_room`, logged once) instead of failing. A full
    server must not keep the learner from starting: only the learner's acknowledgements give its
    memory back.

    Raises:
        redis.ResponseError: the command's own error (e.g. ``BUSYGROUP``).
    """
    wait_for_room(what, run_atomic, r, keys, [cmd], None)


def create_group(r: redis.Redis, keys: Keys, stream: str, group: str, what: str) -> None:
    """``XGROUP CREATE stream group 0 MKSTREAM`` through :func:`write_small` (also on a full
    server); idempotent: an existing group (``BUSYGROUP``) is left as it is.

    Raises:
        redis.ResponseError: any other error of the command.
    """
    try:
        write_small(r, keys, ("XGROUP", "CREATE", stream, group, "0", "MKSTREAM"), what)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class EpochWatch:
    """The one outage check of every process: after Redis was unreachable (an outage counted by
    :data:`keisei_stream.wire.retry.OUTAGES`, process-wide) or when told so, read the run's
    ``epoch`` key again and compare it with the one this process knows: missing or changed means
    the server restarted without the run's data.

    Attributes:
        epoch: the run's epoch as this process knows it (None: none yet); the owner updates it
            (a worker adopts the new one, the learner claims one).
        outages_seen: :data:`~keisei_stream.wire.retry.OUTAGES` ``.outages`` at the last check.
        found: the ``epoch`` key's value at the last check (None: missing).
        looked: the last :meth:`changed` read the key (after an outage or when forced). With the
            epoch intact the server still holds the run, but it may be a promoted replica or one
            restarted from its files, lacking the last writes the old one acknowledged: the
            learner and the workers then compare what they wrote with what it holds (a failover's
            losses, :meth:`keisei_stream.wire.consumer.Consumer.record_failover`,
            :meth:`keisei_stream.wire.producer.Producer.reconcile`).
    """

    epoch: str | None = None
    outages_seen: int = field(default_factory=lambda: retry.OUTAGES.outages)
    found: str | None = None
    looked: bool = False

    def changed(self, r: redis.Redis, keys: Keys, force: bool = False) -> bool:
        """After a new outage (or with ``force``): True when the ``epoch`` key is missing or differs
        from :attr:`epoch` (then :attr:`found` holds what is there); False without an outage
        (:attr:`looked` says which)."""
        self.looked = False
        if retry.OUTAGES.outages == self.outages_seen and not force:
            return False
        self.outages_seen, self.looked = retry.OUTAGES.outages, True
        raw = r.get(keys.epoch)
        self.found = None if raw is None else as_str(raw)
        return self.found is None or self.found != self.epoch
