"""The Redis client every process uses: one place for its settings.

:func:`connect` builds a :class:`redis.Redis` whose socket timeout (75 s) exceeds every
``BLOCK`` the consumer uses (<= 60 s is allowed by the config; pass a larger ``socket_timeout``
for longer blocks), with health checks and the one retry policy (:mod:`.retry`: every call
waits out an outage of any length). :func:`as_str` reads its byte replies as text.

A ``redis+sentinel://`` URL (:func:`parse_sentinel_url`) reaches the primary of a group that
Redis Sentinel watches: the client asks the Sentinels for the primary's address at every
(re)connection, so after a failover the retry policy's next attempt lands on the promoted
replica (redis-py's :class:`redis.sentinel.Sentinel` does the work;
https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from .retry import RetryForever

#: Schemes of Sentinel URLs (``rediss+``: TLS to the Sentinels and to the data nodes).
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Query parameters a Sentinel URL may carry: the Sentinels' own credentials (when they have
#: ``requirepass`` or ACL users of their own; default none).
_SENTINEL_PARAMS = ("sentinel_username", "sentinel_password")

#: Default client socket timeout in seconds; must exceed every XREADGROUP BLOCK time
#: (StreamConfig.block_ms allows up to 60 s).
SOCKET_TIMEOUT_S = 75.0


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL (:func:`parse_sentinel_url`)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    sentinel_auth: dict[str, str] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]
    [?sentinel_username=U&sentinel_password=P]`` (``rediss+sentinel://`` for TLS).

    ``USER:PASSWORD`` authenticate to the data nodes (the primary and its replicas: the run's
    ACL user); the Sentinels' own credentials, if they have any, go in the query. The port
    defaults to 26379, the database to 0; ``SERVICE`` is the name the Sentinels monitor
    (``sentinel monitor SERVICE ...``).

    Raises:
        ValueError: another scheme, no Sentinel address, no service name, a bad port or
            database, or an unknown query parameter.
    """
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (expected {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = [_host_port(hp) for hp in hostlist.split(",") if hp]
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"a Sentinel URL needs HOST[:PORT][,...]/SERVICE[/DB], got {hostlist!r} and path {parts.path!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(_SENTINEL_PARAMS))
    if unknown:
        raise ValueError(f"unknown query parameter(s) {unknown} in a Sentinel URL (known: {list(_SENTINEL_PARAMS)})")
    auth = {k[len("sentinel_"):]: unquote(v) for k, v in query.items()}
    return SentinelURL(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       unquote(user) or None, unquote(password) or None, parts.scheme.startswith("rediss"), auth)


def _host_port(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)`` (port 26379 when absent)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    port = port or "26379"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad Sentinel address {text!r} (expected HOST[:PORT])")
    return host, int(port)


class SentinelConnection(SentinelManagedConnection):
    """A connection to the primary of a Sentinel group that asks the Sentinels for the primary's
    address at every (re)connection, including the reconnection of a command that failed half-way.

    redis-py 8.2's :class:`SentinelManagedConnection` asks only when the pool hands the connection
    out: a command that loses its connection (the primary killed during an ``XREADGROUP BLOCK``)
    reconnects inside the client's retry to the address it had, and under
    :class:`~keisei_stream.wire.retry.RetryForever` it would try the dead primary for ever (seen in
    ``benchmarks/fleet.py --failover``; ``tests/test_failover.py`` covers it). Here every connect
    resolves the primary first and makes one attempt; the command's retry policy does the rest.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock:
            return
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=False)


def connect(url: str, **kw: Any) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``, or ``redis+sentinel://``,
    see :func:`parse_sentinel_url`) with safe defaults.

    Defaults (override any through ``kw``, which goes to :meth:`redis.Redis.from_url`):
    ``socket_timeout=75`` s (above every BLOCK; the config allows <= 60 s), ``socket_connect_timeout=5`` s,
    ``health_check_interval=10`` s, ``retry=RetryForever()`` (the one retry policy: every call waits
    out an outage of any length, see :mod:`keisei_stream.wire.retry`), ``decode_responses=False``
    (the codec needs bytes).

    Note: a command retried after a lost connection may have run twice on the server;
    the producer's record (read under WATCH before each add) and batch ids make that harmless.

    Through Sentinel the client connects to whichever node the Sentinels name as the primary,
    at every (re)connection: after a failover the retry policy's next attempt reaches the
    promoted replica (a demoted primary's ``READONLY`` answer also makes it ask again).

    Raises:
        ValueError: for a malformed URL (from redis-py, or :func:`parse_sentinel_url`).
            Connection errors appear on first use.
    """
    opts: dict[str, Any] = dict(
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        health_check_interval=10,
        retry=RetryForever(),
        decode_responses=False,
    )
    opts.update(kw)
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        su = parse_sentinel_url(url)
        tls = {"ssl": True} if su.ssl else {}
        sentinel = Sentinel(list(su.sentinels), socket_timeout=opts["socket_connect_timeout"],
                            sentinel_kwargs={"socket_timeout": opts["socket_connect_timeout"], **su.sentinel_auth, **tls})
        return sentinel.master_for(su.service, db=su.db, username=su.username, password=su.password,
                                   connection_class=SentinelConnection, **tls, **opts)
    return redis.Redis.from_url(url, **opts)


def as_str(value: Any) -> str:
    """A reply value of a :func:`connect` client (``bytes``, since ``decode_responses=False``) as
    ``str``: UTF-8 with invalid bytes replaced; anything else through ``str()``."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


#: Environment variable holding a process's Redis URL: ``keisei run`` passes each child its URL
#: (with the password) there, where ``ps`` does not show it.
URL_ENV = "KEISEI_REDIS"


def add_redis_argument(parser: argparse.ArgumentParser) -> None:
    """``--redis URL`` of a process (``python -m workers``, ``python -m learner``): required unless
    the environment variable :data:`URL_ENV` holds the URL, which is then its default."""
    parser.add_argument("--redis", default=os.environ.get(URL_ENV), required=URL_ENV not in os.environ,
                        help="Redis URL, e.g. redis://:PASSWORD@host:6379/0 or unix:///path/redis.sock (default: the "
                             f"environment variable {URL_ENV}, which keeps a password out of the process list)")
