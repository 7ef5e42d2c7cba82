"""Least-privilege Redis ACL users of a run: one per role, each allowed only what its process does.

Roles (users are named ``keisei-{run}-{role}``):

* ``worker``: add experience through the admission script (``EVALSHA``/``EVAL`` of it, and the
  ``XLEN``/``XADD``/``HGET``/``HSET``/``HINCRBY`` the script runs on ``experience``,
  ``producers`` and ``accounting``), write heartbeats (``workers:*``) and game records
  (``games``), read ``config``, ``control``, ``epoch`` and the weights, subscribe to the weights
  channel.
  Nothing else: no write to weights, config, control or the learner's hash, no consumer-group
  command (``XGROUP``, ``XREADGROUP``, ``XACK``, ``XAUTOCLAIM``), no ``XDEL``/``XTRIM``/``DEL``,
  no key outside the run.
* ``learner``: every data command on the run's keys and channels (consumer group, weights,
  status, streams), but no administrative or dangerous command (``FLUSHALL``, ``CONFIG``,
  ``ACL``, ``KEYS``, ``SHUTDOWN``...).
* ``evaluator``: reads the run's keys, writes the ``eval`` stream and the Elo table.
* ``monitor``: read-only on the run's keys (``keisei status``).

Commands run inside a Lua script are checked against the caller's ACL (Redis >= 7), so a
worker's ``EVAL`` cannot reach past its rules. Key permissions use Redis 7 selectors: ``%R~``
read-only, ``~`` read and write (https://redis.io/docs/latest/operate/oss_and_stack/management/security/acl/).
"""

from __future__ import annotations

import secrets
from typing import Any

from keisei_stream.wire.keys import Keys

ROLES = ("worker", "learner", "evaluator", "monitor")

#: Connection housekeeping every client needs (redis-py sends CLIENT SETINFO on connect).
_CONNECTION = ("+ping", "+hello", "+auth", "+select", "+client|setinfo", "+client|setname", "+quit", "+reset")


def username(run: str, role: str) -> str:
    """``keisei-{run}-{role}``.

    Raises:
        ValueError: unknown role.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return f"keisei-{Keys(run).run}-{role}"


def role_rules(keys: Keys, role: str) -> list[str]:
    """The ``ACL SETUSER`` rules (without ``on`` and the password) of ``role`` for the run of ``keys``.

    Raises:
        ValueError: unknown role.
    """
    p = keys.prefix
    if role == "worker":
        return [
            "resetkeys", "resetchannels", "-@all", *_CONNECTION,
            "+evalsha", "+eval", "+script|load", "+script|exists",
            "+xadd", "+xlen", "+hget", "+hset", "+hincrby", "+pexpire", "+expire", "+multi", "+exec",
            "+get", "+hgetall", "+hmget", "+subscribe", "+unsubscribe",
            f"~{keys.experience}", f"~{keys.producers}", f"~{keys.accounting}", f"~{p}workers:*", f"~{keys.games}",
            f"%R~{keys.config}", f"%R~{keys.control}", f"%R~{keys.epoch}", f"%R~{p}weights:*",
            f"&{keys.weights_channel}",
        ]
    if role == "learner":
        return ["resetkeys", "resetchannels", "-@all", "+@read", "+@write", "+@stream", "+@hash", "+@string",
                "+@keyspace", "+@pubsub", "+@scripting", "+@transaction", "+@connection",
                "-@dangerous", "-@admin", *_CONNECTION, f"~{p}*", f"&{p}*"]
    if role == "evaluator":
        return ["resetkeys", "resetchannels", "-@all", "+@read", "+@connection", *_CONNECTION,
                "+xadd", "+hset", "+set", "+subscribe", "+unsubscribe", "-@dangerous",
                f"%R~{p}*", f"~{keys.eval}", f"~{p}elo*", f"&{keys.weights_channel}"]
    if role == "monitor":
        return ["resetkeys", "resetchannels", "-@all", "+@read", "+@connection", *_CONNECTION, "-@dangerous",
                f"%R~{p}*"]
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def create_users(r: Any, run: str, passwords: dict[str, str] | None = None) -> dict[str, str]:
    """Create (or reset) the run's role users on the server of ``r``.

    Args:
        r: a client allowed to run ``ACL SETUSER`` (the server's admin or default user).
        run: the run id.
        passwords: role -> password; roles missing from it get a fresh random password
            (32 hex characters from :mod:`secrets`).

    Returns:
        role -> password of every role in :data:`ROLES`.

    Raises:
        redis.exceptions.ResponseError: the server refused a rule (Redis < 7 has no selectors).
    """
    keys = Keys(run)
    out: dict[str, str] = {}
    for role in ROLES:
        password = (passwords or {}).get(role) or secrets.token_hex(16)
        r.execute_command("ACL", "SETUSER", username(run, role), "reset", "on", f">{password}",
                          *role_rules(keys, role))
        out[role] = password
    return out


def strip_user(url: str) -> str:
    """``url`` without its ``user:password@`` part."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0] or (scheme == "unix" and "@" in rest):
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def user_url(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` put in (replacing any userinfo it had).

    ``redis://host:6379/0`` -> ``redis://user:pw@host:6379/0``; ``unix:///path/redis.sock`` ->
    ``unix://user:pw@/path/redis.sock`` (the form redis-py parses for unix sockets).
    """
    if "://" not in url:
        raise ValueError(f"not a Redis URL: {url!r}")
    scheme, _, rest = strip_user(url).partition("://")
    return f"{scheme}://{user}:{password}@{rest}"
