"""Least-privilege Redis ACL users of a run: one per role, and one per worker, each allowed only
what its process does.

Users are named ``keisei-{run}-{role}`` and ``keisei-{run}-worker-{id}``:

* a **worker** (one user per worker id): add experience through the admission script
  (:mod:`keisei_stream.wire.producer`: ``EVALSHA``/``EVAL``, and the ``XLEN``/``XADD``/``XREVRANGE``
  the script runs on ``experience`` and the worker's own ``producers:{id}`` record), write its own
  heartbeat (``workers:{id}``) and game records (``games``), read ``config``, ``control``,
  ``epoch`` and the weights, subscribe to the weights channel. Every write a worker can make is
  an ``XADD``, on four keys. Nothing else: not the accounting, the weights, config, control, the
  learner's hash, another worker's heartbeat or producer record, no consumer-group command
  (``XGROUP``, ``XREADGROUP``, ``XACK``, ``XAUTOCLAIM``), no ``XDEL``/``DEL``/``EXPIRE``, no key
  outside the run.
* ``learner``: every data command on the run's keys and channels (consumer group, weights,
  status, streams), but no administrative or dangerous command (``FLUSHALL``, ``CONFIG``,
  ``ACL``, ``KEYS``, ``SHUTDOWN``...).
* ``evaluator``: reads the run's keys, writes the ``eval`` stream and the Elo table.
* ``monitor``: read-only on the run's keys (``keisei status``).
* ``reader``: what a host's read-only copy of the run serves its workers, and nothing else: ``GET``
  ``config``, ``control``, ``epoch``, the weights (``weights:latest``, the blobs), and ``SUBSCRIBE``
  to the weights channel. ``keisei relay`` uses it on the primary to fetch each version once for
  its host, and creates the same user (same password) on the host's own server, where the host's
  workers read with it (``python -m workers --read-redis``). ACL users are not replicated: on a
  replica used the same way (``replicaof`` the primary) create it too (``keisei users --redis
  REPLICA_ADMIN_URL --role reader --password PW``).

Commands run inside a Lua script are checked against the caller's ACL (Redis 6.2 and 7+ alike),
so a worker's ``EVAL`` cannot reach past its rules. The rules depend on the server
(:class:`keisei_stream.ops.compat.ServerInfo`): Redis >= 7.0 gets ``%R~`` read-only key
patterns for what a user only reads; Redis 6.2 has no such selectors, so there the read keys
are plain ``~`` patterns: harmless for workers and the monitor, whose only write command is
``XADD`` (refused with ``WRONGTYPE`` on the run's existing strings and hashes) or who have no
write command at all, but the evaluator can then write every key of the run. Limits of Redis
ACLs (they cannot restrict a command's arguments): a worker allowed ``XADD`` on ``experience``
can also trim it (``XADD ... MAXLEN 0``); the accounting then shows the trimmed positions as
produced and never settled, so it is detected, not prevented.
(https://redis.io/docs/latest/operate/oss_and_stack/management/security/acl/)
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Iterable

from keisei_stream.ops.compat import LATEST, ServerInfo, server_info
from keisei_stream.wire.keys import Keys

#: The shared roles; workers get a user each (:func:`worker_role`).
ROLES = ("learner", "evaluator", "monitor", "reader")
_WORKER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # goes into a user name and a URL's userinfo


def worker_role(worker_id: str) -> str:
    """``"worker:{id}"``: the role of one worker's user.

    Raises:
        ValueError: ``worker_id`` is not ``[A-Za-z0-9_.-]{1,64}``.
    """
    if not isinstance(worker_id, str) or not _WORKER_ID.match(worker_id):
        raise ValueError(f"invalid worker id for a Redis user {worker_id!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return f"worker:{worker_id}"


def _split(role: str) -> tuple[str, str | None]:
    if role.startswith("worker:"):
        wid = role[len("worker:"):]
        worker_role(wid)  # checks the id
        return "worker", wid
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or worker:ID, got {role!r}")
    return role, None


def username(run: str, role: str) -> str:
    """``keisei-{run}-{role}``, for a worker's role ``worker:{id}``: ``keisei-{run}-worker-{id}``.

    Raises:
        ValueError: unknown role or bad worker id.
    """
    kind, wid = _split(role)
    return f"keisei-{Keys(run).run}-{kind}" + (f"-{wid}" if wid else "")


def _connection(server: ServerInfo) -> list[str]:
    """Connection housekeeping every client needs, as far as the server knows the command names
    (``+quit`` from 7.0, ``+client|setinfo`` from 7.2: redis-py sends it on connect and ignores a refusal)."""
    rules = ["+ping", "+hello", "+auth", "+select", "+client|setname", "+reset"]
    if server.acl_quit:
        rules.append("+quit")
    if server.acl_setinfo:
        rules.append("+client|setinfo")
    return rules


def role_rules(keys: Keys, role: str, server: ServerInfo = LATEST) -> list[str]:
    """The ``ACL SETUSER`` rules (without ``on`` and the password) of ``role`` (one of
    :data:`ROLES`, or ``worker:{id}``) for the run of ``keys`` on ``server``.

    Raises:
        ValueError: unknown role or bad worker id.
    """
    kind, wid = _split(role)
    p = keys.prefix
    ro = "%R~" if server.read_only_selectors else "~"  # 6.2: no read-only selectors (module doc)
    base = ["resetkeys", "resetchannels", "-@all"]
    if kind == "worker":
        return [*base, *_connection(server), "+evalsha", "+eval", "+script|load", "+script|exists",
                "+xadd", "+xlen", "+xrevrange", "+get", "+hget", "+hgetall", "+hmget", "+subscribe", "+unsubscribe",
                f"~{keys.experience}", f"~{keys.games}", f"~{keys.worker(wid)}", f"~{keys.producer(wid)}",
                f"{ro}{keys.config}", f"{ro}{keys.control}", f"{ro}{keys.epoch}", f"{ro}{p}weights:*",
                f"&{keys.weights_channel}"]
    if kind == "learner":
        return [*base, "+@read", "+@write", "+@stream", "+@hash", "+@string", "+@keyspace", "+@pubsub",
                "+@scripting", "+@transaction", "+@connection", "-@dangerous", "-@admin", *_connection(server),
                f"~{p}*", f"&{p}*"]  # the connection rules after -@dangerous/-@admin, which must not remove them
    if kind == "evaluator":
        return [*base, "+@read", "+@connection", "+xadd", "+hset", "+set", "+subscribe", "+unsubscribe",
                "-@dangerous", *_connection(server), f"{ro}{p}*", f"~{keys.eval}", f"~{p}elo*",
                f"&{keys.weights_channel}"]
    if kind == "reader":
        return [*base, *_connection(server), "+get", "+hget", "+hgetall", "+subscribe", "+unsubscribe",
                f"{ro}{keys.config}", f"{ro}{keys.control}", f"{ro}{keys.epoch}", f"{ro}{p}weights:*",
                f"&{keys.weights_channel}"]
    return [*base, "+@read", "+@connection", "-@dangerous", *_connection(server), f"{ro}{p}*"]  # monitor


def create_users(r: Any, run: str, workers: Iterable[str] = (), passwords: dict[str, str] | None = None,
                 server: ServerInfo | None = None) -> dict[str, str]:
    """Create (or reset) the run's users on the server of ``r``: the :data:`ROLES` and one user
    per worker id in ``workers``.

    Args:
        r: a client allowed to run ``ACL SETUSER`` (the server's admin or default user).
        run: the run id.
        workers: worker ids (``[A-Za-z0-9_.-]{1,64}``), one user each.
        passwords: role -> password; roles missing from it get a fresh random password
            (32 hex characters from :mod:`secrets`).
        server: the server's version (rules differ, see the module doc); None: asked with ``INFO``.

    Returns:
        role -> password, for every role in :data:`ROLES` and ``worker:{id}`` per worker.

    Raises:
        ValueError: a bad worker id (before any user is created).
        redis.exceptions.ResponseError: the server refused a rule.
    """
    server = server or server_info(r)
    roles = [*ROLES, *(worker_role(w) for w in workers)]
    out: dict[str, str] = {}
    for role in roles:
        out[role] = create_user(r, run, role, (passwords or {}).get(role) or secrets.token_hex(16), server)
    return out


def create_user(r: Any, run: str, role: str, password: str, server: ServerInfo) -> str:
    """Create (or reset) the user of one ``role`` of the run with ``password`` on the server of
    ``r`` (e.g. the ``reader`` on a host's replica, with the primary's password: ACL users are
    not replicated); returns the password.

    Raises:
        ValueError: unknown role or bad worker id.
        redis.exceptions.ResponseError: the server refused a rule.
    """
    r.execute_command("ACL", "SETUSER", username(run, role), "reset", "on", f">{password}",
                      *role_rules(Keys(run), role, server))
    return password


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
