"""Least-privilege Redis ACL users of a run: one per role, and one per worker, each allowed only
what its process does.

Users are named ``keisei-{run}-{role}`` and ``keisei-{run}-worker-{id}``:

* a **worker** (one user per worker id): ``XADD`` to its own keys only (its experience stream
  ``experience:{id}``, its game stream ``games:{id}``, its heartbeat ``workers:{id}``, its producer
  record ``producers:{id}``), in ``MULTI/EXEC`` with ``WATCH`` on them
  (:mod:`keisei_stream.wire.producer`), ``XLEN``/``XREVRANGE`` on them; read ``config``,
  ``control``, ``epoch``, ``credit`` and the weights; subscribe to the weights channel. Every
  write a worker can make is an ``XADD`` to a key of its own. No scripting at all (no ``EVAL``,
  ``EVALSHA``, ``SCRIPT``, ``FUNCTION``/``FCALL``: a script's commands are checked against the
  caller's rules, but the script itself can keep the server busy, answering ``BUSY`` to everyone,
  or build strings outside ``maxmemory``). Nothing else: not another worker's keys, the
  accounting, the weights, config, control, the credit, the roster, the learner's hash, the
  shared ``games`` stream, no consumer-group command (``XGROUP``, ``XREADGROUP``, ``XACK``,
  ``XAUTOCLAIM``), no ``XDEL``/``DEL``/``EXPIRE``, no key outside the run.
* ``learner``: every data command on the run's keys and channels (consumer group, weights,
  status, streams, its own scripts), but no administrative or dangerous command (``FLUSHALL``,
  ``CONFIG``, ``ACL``, ``KEYS``, ``SHUTDOWN``...).
* ``evaluator``: reads the run's keys, writes the ``eval`` stream and the Elo table.
* ``monitor``: read-only on the run's keys (``keisei status``).
* ``reader``: what a host's read-only copy of the run serves its workers, and nothing else: ``GET``
  ``config``, ``control``, ``epoch``, the weights (``weights:latest``, the blobs), and ``SUBSCRIBE``
  to the weights channel. ``keisei relay`` uses it on the primary to fetch each version once for
  its host, and creates the same user (same password) on the host's own server, where the host's
  workers read with it (``python -m workers --read-redis``). ACL users are not replicated: on a
  replica used the same way (``replicaof`` the primary) create it too (``keisei users --redis
  REPLICA_ADMIN_URL --role reader --password PW``).

What a worker's credential can still do, all to its own keys (Redis ACLs cannot restrict a
command's arguments): ``XADD ... MAXLEN 0`` on its own stream trims its own unread positions
(they show as its unsettled positions); the largest id exhausts its own stream (the learner
resets it once read empty); garbage is dead-lettered; a forged producer record or heartbeat
misreports only itself. And one thing to everybody: fill the server's memory up to
``maxmemory`` with ``XADD`` s to its own keys (every write then waits for room), within the
request-size limits the private server is started with (:func:`keisei_stream.ops.local.request_limit`);
keeping that out needs a front door between workers and Redis.

The rules depend on the server (:class:`keisei_stream.ops.compat.ServerInfo`): Redis >= 7.0 gets
``%R~`` read-only key patterns for what a user only reads; Redis 6.2 has no such selectors, so
there the read keys are plain ``~`` patterns: a worker's only write command is ``XADD``, refused
with ``WRONGTYPE`` on the run's existing strings and hashes (a read key that does not exist yet,
e.g. ``credit`` before the learner's first write, could be created as a stream: the learner
overwrites ``credit`` whatever its type), and the monitor has no write command at all; but the
evaluator can then write every key of the run.
(https://redis.io/docs/latest/operate/oss_and_stack/management/security/acl/)
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Iterable

from keisei_stream.ops.compat import LATEST, ServerInfo, require_supported, server_info
from keisei_stream.wire.client import as_str
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import register_workers

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


#: Every command a worker's user may run (besides connection housekeeping): one write, ``XADD``,
#: in transactions; reads of its own keys and of the run's config, control, epoch, credit and
#: weights; the weights channel. No scripting.
WORKER_COMMANDS = ("+xadd", "+xlen", "+xrevrange", "+multi", "+exec", "+discard", "+watch", "+unwatch",
                   "+get", "+hget", "+hgetall", "+hmget", "+subscribe", "+unsubscribe")


def worker_keys(keys: Keys, worker_id: str) -> tuple[str, ...]:
    """The keys worker ``worker_id`` may write (``XADD``): its experience stream, game stream,
    heartbeat and producer record."""
    return (keys.experience(worker_id), keys.worker_games(worker_id), keys.worker(worker_id),
            keys.producer(worker_id))


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


def role_rules(keys: Keys, role: str, server: ServerInfo = LATEST, host_copies: bool = False) -> list[str]:
    """The ``ACL SETUSER`` rules (without ``on`` and the password) of ``role`` (one of
    :data:`ROLES`, or ``worker:{id}``) for the run of ``keys`` on ``server``. With
    ``host_copies`` a worker reads ``config``, ``control`` and the weights (and hears their
    channel) on its host's copy of the run (``keisei relay``, or a replica, as the ``reader``),
    so its user here gets none of them: only ``epoch`` and ``credit`` besides its own keys (its
    credential then cannot fetch weights blobs over the primary's link).

    Raises:
        ValueError: unknown role or bad worker id.
    """
    kind, wid = _split(role)
    p = keys.prefix
    ro = "%R~" if server.read_only_selectors else "~"  # 6.2: no read-only selectors (module doc)
    base = ["resetkeys", "resetchannels", "-@all"]
    if kind == "worker":
        served = [] if host_copies else [f"{ro}{keys.config}", f"{ro}{keys.control}", f"{ro}{p}weights:*",
                                         f"&{keys.weights_channel}"]
        return [*base, *_connection(server), *WORKER_COMMANDS,
                *(f"~{k}" for k in worker_keys(keys, wid)), f"{ro}{keys.epoch}", f"{ro}{keys.credit}", *served]
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
                 server: ServerInfo | None = None, host_copies: bool = False) -> dict[str, str]:
    """Create (or reset) the run's users on the server of ``r``: the :data:`ROLES` and one user
    per worker id in ``workers``.

    Args:
        r: a client allowed to run ``ACL SETUSER`` (the server's admin or default user).
        run: the run id.
        workers: worker ids (``[A-Za-z0-9_.-]{1,64}``), one user each.
        passwords: role -> password; roles missing from it get a fresh random password
            (32 hex characters from :mod:`secrets`).
        server: the server's version (rules differ, see the module doc); None: asked with ``INFO``.
        host_copies: the workers read through their hosts' copies (:func:`role_rules`).

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
        out[role] = create_user(r, run, role, (passwords or {}).get(role) or secrets.token_hex(16), server,
                                host_copies)
    return out


def create_user(r: Any, run: str, role: str, password: str, server: ServerInfo, host_copies: bool = False) -> str:
    """Create (or reset) the user of one ``role`` of the run with ``password`` on the server of
    ``r`` (e.g. the ``reader`` on a host's replica, with the primary's password: ACL users are
    not replicated); returns the password. ``host_copies``: :func:`role_rules`.

    Raises:
        ValueError: unknown role or bad worker id.
        redis.exceptions.ResponseError: the server refused a rule.
    """
    r.execute_command("ACL", "SETUSER", username(run, role), "reset", "on", f">{password}",
                      *role_rules(Keys(run), role, server, host_copies))
    return password


def create_on_nodes(clients: Iterable[Any], run: str, workers: Iterable[str] = (),
                    passwords: dict[str, str] | None = None, role: str | None = None,
                    host_copies: bool = False, servers: list[ServerInfo] | None = None) -> dict[str, str]:
    """What ``keisei users`` does on a run's nodes: on every server of ``clients`` (admins; the
    primary, its replicas, a Sentinel group's other nodes: ACL users are not replicated) the
    server's version is checked and the run's users are created with the same passwords
    (:func:`create_users`; with ``role``, that one user only, its password from ``passwords``);
    the workers (or ``role``'s worker) go on the run's roster on each server that is a primary
    (``ROLE``: a replica receives the roster by replication). ``servers``: the nodes' versions,
    one per client, when the caller has already checked them (not asked again).

    Returns:
        role -> password.

    Raises:
        keisei_stream.ops.compat.UnsupportedServer: a server older than the minimum.
        ValueError: a bad worker id or role, or ``role`` without its password.
        redis.exceptions.ResponseError: a server refused a rule.
    """
    workers = list(workers)
    if role is not None:
        _split(role)
        if not (passwords or {}).get(role):
            raise ValueError(f"the role {role} needs its password (the one it has on the primary)")
        roster = [role[len("worker:"):]] if role.startswith("worker:") else []
    else:
        roster = workers
    out = dict(passwords or {})
    clients = list(clients)
    for r, server in zip(clients, servers or [None] * len(clients)):
        server = server or require_supported(r)
        if role is not None:
            create_user(r, run, role, out[role], server, host_copies)
        else:
            out = create_users(r, run, workers, out, server, host_copies)
        if roster and as_str(r.execute_command("ROLE")[0]) == "master":
            register_workers(r, Keys(run), roster)
    return {role: out[role]} if role is not None else out


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
