"""Atomic groups of Redis writes that a full server cannot refuse and a restarted one cannot take.

The learner's acknowledgements (XACK + XDEL + counters) and its weights (blob + ``weights:latest``)
must land (1) all together, (2) even when the server is at ``maxmemory`` (acknowledging is how a
full server gets memory back, and the weights replace a blob pruned just before), and (3) only in
the server that holds the run's data: after a restart without persistence, counts meant for the
old server would corrupt the new one's accounting. :func:`run_atomic` runs them in one Lua script
that first checks the run's ``epoch`` key; when the server refuses for lack of memory it runs the
same script flagged ``allow-oom`` (Redis >= 7, https://redis.io/docs/latest/develop/interact/programmability/eval-intro/#script-flags).
"""

from __future__ import annotations

from typing import Any

import redis

from .keys import Keys
from .retry import is_oom

# Runs the commands given in ARGV[2:] (each as: argument count, command, arguments...) atomically,
# but only while the run's epoch (KEYS[1]) is still ARGV[1] ('' = not checked): acknowledgements and
# counts meant for a server that lost the run's data must never land in the restarted one.
_ATOMIC_BODY = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EPOCH the run epoch changed: the server lost the run data')
end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""
# The same, allowed to run while the server is at maxmemory ("allow-oom", Redis >= 7):
# acknowledging and deleting entries is how a full server gets memory back.
_ATOMIC_ALLOW_OOM_LUA = "#!lua flags=allow-oom" + _ATOMIC_BODY


class EpochChanged(RuntimeError):
    """The server no longer holds the run's epoch: it restarted without the run's data."""


def run_atomic(r: redis.Redis, keys: Keys, cmds: list[tuple], epoch: str | None) -> None:
    """Run ``cmds`` (tuples: command, arguments) atomically in one script, only while the run's
    ``epoch`` key still holds ``epoch`` (None: not checked); past ``maxmemory`` when the server is full.

    Raises:
        EpochChanged: the server lost the run's data since ``epoch`` was read (nothing ran).
        redis.exceptions.OutOfMemoryError: the server is full and cannot run flagged scripts.
        redis.ResponseError: a command's own error.
    """
    argv: list[Any] = [epoch or ""]
    for c in cmds:
        argv += [len(c), *c]
    try:
        try:
            r.eval(_ATOMIC_BODY, 1, keys.epoch, *argv)
        except redis.ResponseError as exc:
            if not is_oom(exc):
                raise
            try:
                r.eval(_ATOMIC_ALLOW_OOM_LUA, 1, keys.epoch, *argv)
            except redis.ResponseError as again:
                if "EPOCH" in str(again) or is_oom(again):
                    raise
                raise exc from again  # no script flags (Redis < 7): the server is simply full
    except redis.ResponseError as exc:
        if "EPOCH" in str(exc):
            raise EpochChanged(str(exc)) from None
        raise
