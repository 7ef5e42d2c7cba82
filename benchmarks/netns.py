"""Hosts on one machine: Linux network namespaces joined by a bridge, for ``benchmarks/fleet.py``
and the tests that need several hosts (``tests/test_fleet.py``). Needs root (``CAP_NET_ADMIN``)
and iproute2 (``ip``, ``tc``).

Everything lives inside namespaces this module creates, named ``{tag}-...`` with a tag of the
form ``kfleet{pid}`` (the process that made them): a switch namespace holding the bridge ``br0``,
and one namespace per host whose only interface besides ``lo`` is ``eth0``, the end of a veth pair
whose other end is a port of the bridge. Nothing is added to the machine's own namespace (no
interface, address or route), and :meth:`Net.close` (also on errors) kills what runs in the
namespaces and deletes them; :func:`remove_stale` removes what a killed run left behind.

A host's egress can be capped with ``tc``'s token bucket filter on its ``eth0``
(https://man7.org/linux/man-pages/man8/tc-tbf.8.html): e.g. ``1gbit`` for the Redis host's link.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

#: Namespace names this module makes start with it (then the pid of the process that made them).
PREFIX = "kfleet"
#: The hosts' network (a /16 inside the namespaces only).
SUBNET = "10.213"


def require_root_net() -> str | None:
    """None when namespaces can be made here, else why not (for a skip or an error message)."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for network namespaces"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"needs iproute2 ({', '.join(missing)} not found)"
    return None


def _run(*cmd: str, check: bool = True) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


@dataclass
class Host:
    """A namespace with one address on the bridge."""

    name: str
    ns: str
    addr: str
    port: str  # its veth end in the switch namespace

    @property
    def prefix(self) -> list[str]:
        """Run a command in this host: ``[*host.prefix, cmd, ...]``."""
        return ["ip", "netns", "exec", self.ns]

    def tx_bytes(self) -> int:
        """Bytes this host has sent on ``eth0`` (its link to the bridge)."""
        out = _run("ip", "netns", "exec", self.ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes")
        return int(out.strip())


@dataclass
class Net:
    """The switch and the hosts of one fleet; use as a context manager (or call :meth:`close`)."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)  # namespaces created, in order

    def __post_init__(self) -> None:
        self.switch = f"{self.tag}-sw"
        self._add_ns(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.made.append(ns)

    def add_host(self, name: str, rate: str | None = None) -> Host:
        """A new host ``name`` (``[a-z0-9]{1,10}``) with the next address; ``rate`` (``1gbit``...)
        caps what it sends (``tc qdisc ... tbf``)."""
        if not re.fullmatch(r"[a-z0-9]{1,10}", name) or name in self.hosts:
            raise ValueError(f"bad or repeated host name {name!r}")
        i = len(self.hosts) + 1
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{i // 250}.{i % 250 + 1}", f"p{i}")
        self._add_ns(host.ns)
        _run("ip", "-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        _run("ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.addr}/16", "dev", "eth0")
        _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.ns, "link", "set", "lo", "up")
        if rate:
            # burst: at least rate/HZ (https://man7.org/linux/man-pages/man8/tc-tbf.8.html); 1 MB for 1 Gbit/s
            _run("tc", "-n", host.ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "1mb",
                 "latency", "50ms")
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill every process left in the namespaces, then delete them (idempotent)."""
        for ns in reversed(self.made):
            _kill_in(ns)
            _run("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def __enter__(self) -> "Net":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_in(ns: str) -> None:
    """SIGKILL what still runs in namespace ``ns`` (only processes of the namespaces this module
    made are ever passed here), and wait a moment for them to go."""
    for _ in range(20):
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_stale() -> list[str]:
    """Delete the namespaces of this module whose maker (the pid in their name) is gone: what a
    killed fleet left behind. Returns their names."""
    gone = []
    for line in _run("ip", "netns", "list", check=False).splitlines():
        m = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            _kill_in(m.group(1))
            _run("ip", "netns", "del", m.group(1), check=False)
            gone.append(m.group(1))
    return gone
