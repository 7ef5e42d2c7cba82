"""The Redis client every process uses: one place for its settings.

:func:`connect` builds a :class:`redis.Redis` whose socket timeout (75 s) exceeds every
``BLOCK`` the consumer uses (<= 60 s is allowed by the config; pass a larger ``socket_timeout``
for longer blocks), with health checks and the one retry policy (:mod:`.retry`: every call
waits out an outage of any length). :func:`as_str` reads its byte replies as text.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import redis

from .retry import RetryForever

#: Default client socket timeout in seconds; must exceed every XREADGROUP BLOCK time
#: (StreamConfig.block_ms allows up to 60 s).
SOCKET_TIMEOUT_S = 75.0


def connect(url: str, **kw: Any) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) with safe defaults.

    Defaults (override any through ``kw``, which goes to :meth:`redis.Redis.from_url`):
    ``socket_timeout=75`` s (above every BLOCK; the config allows <= 60 s), ``socket_connect_timeout=5`` s,
    ``health_check_interval=10`` s, ``retry=RetryForever()`` (the one retry policy: every call waits
    out an outage of any length, see :mod:`keisei_stream.wire.retry`), ``decode_responses=False``
    (the codec needs bytes).

    Note: a command retried after a lost connection may have run twice on the server;
    the producer's record (read under WATCH before each add) and batch ids make that harmless.

    Raises:
        ValueError: for a malformed URL (from redis-py). Connection errors appear on first use.
    """
    opts: dict[str, Any] = dict(
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        health_check_interval=10,
        retry=RetryForever(),
        decode_responses=False,
    )
    opts.update(kw)
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
