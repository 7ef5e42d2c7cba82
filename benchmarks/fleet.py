"""The fleet: one run across many hosts, on one machine, in network namespaces (needs root).

``python benchmarks/fleet.py --hosts 8 --synthetic-per-host 50 --minutes 5 [--failover]``

Builds hosts as network namespaces on a bridge (:mod:`netns`), caps the Redis host's egress with
``tc`` (``--link``, default 1 Gbit/s), and runs the run's real processes over TCP, each as its ACL
user (:func:`keisei_stream.ops.acl.create_users`): the primary ``redis-server``; a stand-in for
a GPU learner (``fleet_clients.py learner``: publishes the gpu net's weights, 6.33 MB in
bfloat16, every ``--version-every`` seconds, and reads and acknowledges every entry through the
project's consumer); on every worker host its read-only copy of the run (``--fanout relay``:
``keisei relay`` with its own Redis on a unix socket; ``--fanout replica``: a ``redis-server
--replicaof`` the primary, for comparison) and one process of ``--synthetic-per-host`` synthetic
workers (``fleet_clients.py synthetic``); ``--real-workers`` real workers (``python -m workers
--read-redis``, the gpu net on the CPU, niced) spread over the hosts. With ``--failover`` the
primary has a replica on a host of its own and three Sentinels watch them (every process
connects through ``redis+sentinel://``); the primary is killed with SIGKILL half-way.

Prints one JSON line: ``hosts``, ``workers``, ``egress_per_version_blobs`` (bytes the primary's
host sent on its link per version published, over the blob's size; ``_info``: the same from the
primary's ``INFO`` ``total_net_output_bytes``), ``version_p95_s`` (95th percentile, over every
worker and every version published in the window, of the time from the version's publication to
the worker holding it, SHA-256 verified), ``commands_per_worker_per_s`` (the primary's
``total_commands_processed`` over the window, less this script's own, per worker per second;
``commands_top``: the biggest ``INFO commandstats`` counts per worker per second),
``lost_positions`` (positions the primary acknowledged to the workers and the final accounting
does not hold), ``lost_positions_counted`` (what the workers counted as lost in their records:
adds a failover lost, ``lost_exact`` when the two agree, ``lost_reasons``), ``balanced`` (the
final accounting: produced = trained + stale + rejected + duplicate + still in the streams),
``real_positions_exact`` (each real worker's positions, by its own count, are its producer
record's, held or counted lost, all settled), the synthetic workers' fetches of a version
(``fetch_wall_ms_*``: from the request to the verified bytes; ``fetch_cpu_ms_*``: the fetching
thread's CPU, the client's receive and the SHA-256), the version latency split in two
(``host_copy_p95_s``: publication to the host's copy holding it, the network part;
``after_host_copy_*``: from there to the worker holding it, the host-local part), and with ``--failover`` ``failovers``,
``exited_processes``, the replication lag at the kill and the learner's ``losses`` entries.
The window is steady state: from ``--warmup`` seconds after the first version to the stop (with
``--failover``: to the kill; the figures after the promotion are given as ``after_failover``).

Everything it starts lives in its namespaces and is stopped at the end, also on an error,
Ctrl-C, SIGTERM or its own time limit (:func:`budget_s`); the namespaces are then deleted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import netns  # noqa: E402
from fleet_clients import fleet_config, write_templates  # noqa: E402

from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from keisei_stream.ops import acl, compat, local  # noqa: E402
from keisei_stream.ops.embedded_redis import RedisServer, start_redis, start_sentinel  # noqa: E402
from keisei_stream.wire import status  # noqa: E402
from keisei_stream.wire.client import connect  # noqa: E402
from keisei_stream.wire.keys import Keys  # noqa: E402

RUN = "fleet"
SERVICE = "keisei"
PORT, SENTINEL_PORT = 6379, 26379
MAX_PLIES = 512  # configs/gpu.yaml's env.max_plies


class Stopped(Exception):
    """SIGTERM, or the script's own time limit."""


@dataclass
class Fleet:
    """What one run of the benchmark started (stopped by :meth:`stop`)."""

    args: argparse.Namespace
    net: netns.Net
    work: Path
    admin_pw: str = field(default_factory=lambda: secrets.token_hex(12))
    servers: dict[str, RedisServer] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)  # process -> exit code, before the stop
    killed: set[str] = field(default_factory=set)  # servers killed on purpose (the primary, with --failover)
    urls: dict[str, str] = field(default_factory=dict)  # role -> the URL its processes use
    request_limit: int | None = None  # the Redis nodes' proto-max-bulk-len (the run's, local.request_limit)

    # ------------------------------------------------------------------------------ the servers
    def start_servers(self) -> None:
        """The primary (and with ``--failover`` its replica and three Sentinels), the run's users
        on each node with the same passwords."""
        a = self.args
        nodes = ["redis", "standby"] if a.failover else ["redis"]
        for name in nodes:
            host = self.net.hosts[name]
            extra = ["--port", str(PORT), "--bind", host.addr, "--requirepass", self.admin_pw,
                     "--masterauth", self.admin_pw, "--maxclients", str(2 * self.n_workers + 500),
                     "--repl-diskless-sync-delay", "0"]
            if name == "standby":
                extra += ["--replicaof", self.net.hosts["redis"].addr, str(PORT)]
            self.servers[name] = start_redis(self.work / name, maxmemory="4gb", extra_args=extra, prefix=host.prefix,
                                             max_request_bytes=self.request_limit)
        if a.failover:
            for name in ("redis", "standby", "learner"):
                host = self.net.hosts[name]
                self.servers[f"sentinel-{name}"] = start_sentinel(
                    self.work / f"sentinel-{name}", SERVICE, (self.net.hosts["redis"].addr, PORT), port=SENTINEL_PORT,
                    bind=host.addr, quorum=2, auth_pass=self.admin_pw, down_after_ms=2000,
                    failover_timeout_ms=10_000, prefix=host.prefix)
        # the run's users on every node and the workers on the roster, as keisei users --host-copies makes them
        passwords = acl.create_on_nodes([self.admin(name) for name in nodes], RUN, self.synthetic_ids + self.real_ids,
                                        host_copies=True)
        base = (f"redis+sentinel://" + ",".join(f"{self.net.hosts[n].addr}:{SENTINEL_PORT}"
                                               for n in ("redis", "standby", "learner")) + f"/{SERVICE}/0"
                if a.failover else f"redis://{self.net.hosts['redis'].addr}:{PORT}/0")
        self.urls = {role: acl.user_url(base, acl.username(RUN, role), pw) for role, pw in passwords.items()}
        if a.failover:
            wait_until(lambda: self.admin("standby").info("replication").get("master_link_status") == "up", 60,
                       "the standby in sync")

    def admin(self, name: str):
        """The admin of server ``name`` over its unix socket (reachable from any namespace); a call
        fails after 5 s instead of waiting the server out (the killed primary)."""
        return connect(acl.user_url(self.servers[name].url, "", self.admin_pw), retry=Retry(NoBackoff(), 0),
                       socket_timeout=5.0)

    def primary_name(self) -> str:
        """The node the Sentinels call the primary (``redis`` without ``--failover``)."""
        if not self.args.failover:
            return "redis"
        for name in ("sentinel-learner", "sentinel-standby", "sentinel-redis"):
            try:
                s = connect(self.servers[name].url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
                addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                s.close()
                host = addr[0].decode()
                return next(n for n in ("redis", "standby") if self.net.hosts[n].addr == host)
            except Exception:  # noqa: BLE001 - that Sentinel is unreachable: ask the next
                continue
        return "redis"

    # ------------------------------------------------------------------------------ the processes
    @property
    def n_workers(self) -> int:
        return self.args.hosts * self.args.synthetic_per_host + self.args.real_workers

    @property
    def synthetic_ids(self) -> list[str]:
        return [f"s{h}-{i}" for h in range(self.args.hosts) for i in range(self.args.synthetic_per_host)]

    @property
    def real_ids(self) -> list[str]:
        return [f"r{k}" for k in range(self.args.real_workers)]

    def popen(self, name: str, host: str, cmd: list[str], env: dict[str, str] | None = None,
              stdout=None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen([*self.net.hosts[host].prefix, *cmd], cwd=ROOT, stdout=stdout or log, stderr=log,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
        self.procs[name] = p
        return p

    def start_learner(self, deadline: float) -> None:
        a = self.args
        self.popen("learner", "learner", [sys.executable, str(HERE / "fleet_clients.py"), "learner", "--run", RUN,
                                          "--run-dir", str(self.work / "runs"), "--version-every", str(a.version_every),
                                          "--batch-positions", "256", "--wait-replicas", "1" if a.failover else "0",
                                          "--deadline", str(deadline), "--out", str(self.work / "published.jsonl")],
                   env={"KEISEI_REDIS": self.urls["learner"]})
        admin = self.admin("redis")
        wait_until(lambda: admin.get(Keys(RUN).config) is not None, 120, "the run's config", self)

    def start_host(self, h: int, deadline: float) -> str:
        """Host ``h``'s read-only copy of the run and its synthetic workers; returns the read URL."""
        a, name = self.args, f"h{h}"
        host = self.net.hosts[name]
        if a.fanout == "relay":
            p = self.popen(f"relay-{name}", name, [sys.executable, "-m", "keisei_stream.cli", "relay", "--run", RUN,
                                                   "--socket", str(self.work / f"{name}.sock"),
                                                   "--dir", str(self.work / f"relay-{name}")],
                           env={"KEISEI_REDIS": self.urls["reader"]}, stdout=subprocess.PIPE)
            ready, _, _ = select.select([p.stdout], [], [], 60)
            line = p.stdout.readline().decode() if ready else ""
            m = re.search(r"--read-redis (\S+)", line)
            if not m:
                raise RuntimeError(f"keisei relay on {name} did not start: {line!r} (log {self.work / f'relay-{name}.log'})")
            read_url = m.group(1)
        else:  # a replica of the primary on the host, the reader's user created on it
            primary = self.net.hosts["redis"]
            replica = start_redis(self.work / f"replica-{name}", maxmemory="0", prefix=host.prefix, extra_args=[
                "--replicaof", primary.addr, str(PORT), "--masterauth", self.admin_pw, "--replica-read-only", "yes",
                "--replica-priority", "0"])
            self.servers[f"replica-{name}"] = replica
            pw = self.urls["reader"].split("@")[0].rsplit(":", 1)[1]
            r = connect(replica.url)
            acl.create_user(r, RUN, "reader", pw, compat.server_info(r))
            read_url = acl.user_url(replica.url, acl.username(RUN, "reader"), pw)
        ids = [w for w in self.synthetic_ids if w.startswith(f"s{h}-")]
        if ids:
            users = self.work / f"users-{name}.json"
            users.touch(mode=0o600)
            users.write_text(json.dumps({w: self.urls[f"worker:{w}"] for w in ids}))
            self.popen(f"synthetic-{name}", name, [
                sys.executable, str(HERE / "fleet_clients.py"), "synthetic", "--run", RUN, "--ids", ",".join(ids),
                "--users", str(users), "--read-url", read_url, "--positions-per-s", str(a.positions_per_s),
                "--templates", str(self.work / "templates.msgpack"), "--max-plies", str(MAX_PLIES),
                "--deadline", str(deadline), "--out", str(self.work / f"synthetic-{name}.jsonl")])
        return read_url

    def start_real_worker(self, k: int, read_urls: list[str]) -> None:
        h = k % self.args.hosts
        wid = f"r{k}"
        self.popen(f"worker-{wid}", f"h{h}", ["nice", "-n", "19", sys.executable, "-m", "workers", "--run", RUN,
                                              "--id", wid, "--games", str(self.args.real_games), "--threads", "1"],
                   env={"KEISEI_REDIS": self.urls[f"worker:{wid}"], "KEISEI_READ_REDIS": read_urls[h]})

    def check_processes(self) -> None:
        """Record the processes that exited (before the stop)."""
        for name, p in self.procs.items():
            if p.poll() is not None and name not in self.exited:
                self.exited[name] = p.returncode
        for name, s in self.servers.items():
            if not s.alive() and name not in self.exited and name not in self.killed:
                self.exited[name] = s.process.returncode

    def stop(self) -> None:
        """Every process and server this fleet started: SIGTERM, then SIGKILL after 10 s."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for s in self.servers.values():
            s.stop(timeout=5)


def wait_until(pred, timeout: float, what: str, fleet: Fleet | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if fleet is not None:
            fleet.check_processes()
            if fleet.exited:
                raise RuntimeError(f"waiting for {what}: exited {fleet.exited} (logs in {fleet.work})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------- measuring
@dataclass
class Sample:
    t: float  # unix seconds
    node: str  # the primary at that time
    tx: int  # bytes its host sent on its link
    net_out: int  # INFO total_net_output_bytes
    commands: int  # INFO total_commands_processed
    version: int  # weights:latest
    clients: int  # INFO connected_clients
    cpu: float  # INFO used_cpu_sys + used_cpu_user (seconds)


INFO_COMMANDS = 3  # what one sample sends to the primary: INFO, HGET (and the connection's own)


def sample(fleet: Fleet) -> Sample | None:
    node = fleet.primary_name()
    try:
        r = fleet.admin(node)
        info = r.info()
        v = r.hget(Keys(RUN).weights_latest, "version")
        r.close()
        return Sample(time.time(), node, fleet.net.hosts[node].tx_bytes(), int(info["total_net_output_bytes"]),
                      int(info["total_commands_processed"]), int(v or 0), int(info["connected_clients"]),
                      float(info["used_cpu_sys"]) + float(info["used_cpu_user"]))
    except Exception:  # noqa: BLE001 - the primary is down (the failover): no sample this second
        return None


def commandstats(fleet: Fleet, node: str) -> dict[str, int]:
    try:
        return {k[len("cmdstat_"):]: int(v["calls"]) for k, v in fleet.admin(node).info("commandstats").items()}
    except Exception:  # noqa: BLE001
        return {}


def window_figures(samples: list[Sample], t0: float, t1: float, fleet: Fleet, published: dict[int, float],
                   blob: int) -> dict:
    """Egress per version and commands per worker per second over ``[t0, t1]`` on one node. The
    egress per version is the window's egress rate times the mean interval between the
    publications inside it, over the blob's size: a window holds a fractional number of versions,
    which counting whole publications in it would round (by up to one version's worth)."""
    inside = [s for s in samples if t0 <= s.t <= t1]
    if len(inside) < 2 or inside[0].node != inside[-1].node:
        return {}
    a, b = inside[0], inside[-1]
    versions = sum(1 for v, t in published.items() if a.t < t <= b.t)
    seconds = b.t - a.t
    times = sorted(t for t in published.values() if a.t <= t <= b.t)
    interval = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    own = INFO_COMMANDS * (len(inside) - 1)

    def per_version(nbytes: int) -> float | None:
        return round(nbytes / seconds * interval / blob, 3) if interval and blob else None

    return {"window_s": round(seconds, 1), "versions": versions,
            "version_interval_s": round(interval, 3) if interval else None,
            "egress_per_version_blobs": per_version(b.tx - a.tx),
            "egress_per_version_blobs_info": per_version(b.net_out - a.net_out),
            "egress_mbit_per_s": round((b.tx - a.tx) * 8 / seconds / 1e6, 1),
            "commands_per_worker_per_s": round((b.commands - a.commands - own) / fleet.n_workers / seconds, 3),
            "primary_cpu_share": round((b.cpu - a.cpu) / seconds, 3)}


def held_versions(fleet: Fleet) -> tuple[dict[str, list[tuple[int, float]]], dict[str, dict]]:
    """worker -> ``(version, unix time held)`` (synthetic: their output; real: their log lines), and
    the synthetic workers' output lines."""
    held, out = {}, {}
    for path in fleet.work.glob("synthetic-h*.jsonl"):
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if "process_cpu_s" in d:
                out.setdefault("", {"process_cpu_s": 0.0})["process_cpu_s"] += d["process_cpu_s"]
                continue
            out[d["id"]] = d
            held[d["id"]] = [tuple(x) for x in d["held"]]
    for wid in fleet.real_ids:
        held[wid] = logged_versions(fleet.work / f"worker-{wid}.log", "loaded weights version")
    return held, out


def logged_versions(log: Path, what: str) -> list[tuple[int, float]]:
    """``(version, unix time)`` of the lines ``... {what} N ...`` of a process's log (the logging
    module's ``asctime``, local time, ms)."""
    pat = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*" + re.escape(what) + r" (\d+)")
    out = []
    for line in (log.read_text(errors="replace").splitlines() if log.exists() else []):
        m = pat.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
            out.append((int(m.group(3)), t))
    return out


def version_delays(held: dict[str, list[tuple[int, float]]], published: dict[int, float], t0: float, t1: float,
                   workers: list[str]) -> list[float]:
    """For each version published in ``[t0, t1]`` and each worker: seconds until the worker held it
    or a newer one (``inf`` if it never did)."""
    out = []
    for v, tp in published.items():
        if not t0 <= tp <= t1:
            continue
        for w in workers:
            times = [t for ver, t in held.get(w, []) if ver >= v]
            out.append(min(times) - tp if times else math.inf)
    return out


def after_host_copy(held: dict[str, list[tuple[int, float]]], copies: dict[str, list[tuple[int, float]]],
                    published: dict[int, float], t0: float, t1: float, fleet: Fleet) -> list[float]:
    """For each version published in ``[t0, t1]`` and each worker: seconds from its host's copy
    holding the version to the worker holding it (the host-local part of the latency: one fetch
    from the host's copy and its SHA-256, behind the host's other workers; on this machine also
    behind every other host's, all on the same cores). Workers whose host copy never logged the
    version are left out (counted in ``never_held_pairs`` if they never held it either)."""
    out = []
    workers = [(w, f"h{w[1:].split('-')[0]}") for w in fleet.synthetic_ids] + \
        [(w, f"h{int(w[1:]) % fleet.args.hosts}") for w in fleet.real_ids]
    for v, tp in published.items():
        if not t0 <= tp <= t1:
            continue
        for w, host in workers:
            copied = [t for ver, t in copies.get(host, []) if ver >= v]
            times = [t for ver, t in held.get(w, []) if ver >= v]
            if copied and times:
                out.append(max(0.0, min(times) - min(copied)))
    return out


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


# ---------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, fleet: Fleet) -> dict:
    net, work = fleet.net, fleet.work
    net.add_host("redis", args.link)
    if args.failover:
        net.add_host("standby", args.link)
    net.add_host("learner")
    for h in range(args.hosts):
        net.add_host(f"h{h}")
    fleet.request_limit = local.request_limit(fleet_config(RUN, str(work / "runs"), 256, 0))  # the gpu net's blob x2
    fleet.start_servers()
    write_templates(work / "templates.msgpack", 2, args.batch_positions, MAX_PLIES)
    end = time.time() + 60 + args.minutes * 60 + 120  # hard bound of every client's loops
    fleet.start_learner(end)
    read_urls = [fleet.start_host(h, end) for h in range(args.hosts)]
    for k in range(args.real_workers):
        fleet.start_real_worker(k, read_urls)
    keys = Keys(RUN)
    started = time.time()
    samples: list[Sample] = []
    stats_at: dict[str, tuple[float, dict[str, int]]] = {}
    kill_at = started + args.minutes * 30 if args.failover else math.inf
    killed: dict = {}
    window_start = None
    while time.time() < started + args.minutes * 60:
        time.sleep(max(0.0, 1.0 - (time.time() - (samples[-1].t if samples else 0))))
        s = sample(fleet)
        fleet.check_processes()
        if s is None:
            continue
        samples.append(s)
        if window_start is None and s.version >= 1:
            window_start = s.t + args.warmup
        if window_start is not None and "start" not in stats_at and s.t >= window_start:
            stats_at["start"] = (s.t, commandstats(fleet, s.node))
        if not killed and s.t >= kill_at:
            stats_at["kill"] = (s.t, commandstats(fleet, s.node))
            killed = kill_primary(fleet)
    stop_t = time.time()
    stats_at["stop"] = (stop_t, commandstats(fleet, fleet.primary_name()))
    fleet.check_processes()
    exited_before_stop = dict(fleet.exited)
    return finish(args, fleet, keys, samples, stats_at, killed, window_start or started, stop_t, exited_before_stop)


def kill_primary(fleet: Fleet) -> dict:
    """SIGKILL the primary; with ``--replication-pause S`` the standby first stops applying the
    replication stream for S seconds (``CLIENT PAUSE ... WRITE`` on it: it still reads the stream,
    as a replica on a slow link would, and drops what it did not apply when the link breaks), so
    what the primary acknowledged in those seconds is lost. Returns the replication lag just
    before the kill and the time until the Sentinels name another primary."""
    pause = fleet.args.replication_pause
    if pause > 0:
        fleet.admin("standby").execute_command("CLIENT", "PAUSE", int((pause + 60) * 1000), "WRITE")
        time.sleep(pause)
    lag = {"replication_pause_s": pause}
    try:
        p, s = fleet.admin("redis").info("replication"), fleet.admin("standby").info("replication")
        lag.update({"primary_offset": p["master_repl_offset"], "standby_offset": s.get("slave_repl_offset"),
                    "standby_read_offset": s.get("slave_read_repl_offset"),
                    "lag_bytes": max(0, p["master_repl_offset"] - int(s.get("slave_repl_offset", 0)))})
    except Exception:  # noqa: BLE001
        pass
    t = time.time()
    fleet.killed.add("redis")
    os.kill(fleet.servers["redis"].pid, signal.SIGKILL)
    if pause > 0:  # the standby has seen its link break (what it did not apply is gone); a paused replica
        time.sleep(0.5)  # is no candidate for the Sentinels' promotion
        fleet.admin("standby").execute_command("CLIENT", "UNPAUSE")
    deadline = time.monotonic() + 90
    while fleet.primary_name() == "redis" and time.monotonic() < deadline:
        time.sleep(0.2)
    promoted = fleet.primary_name()
    return {"killed_at": t, "promoted": promoted, "failover_s": round(time.time() - t, 2), **lag}


def finish(args, fleet: Fleet, keys: Keys, samples: list[Sample], stats_at, killed, window_start: float,
           stop_t: float, exited_before_stop: dict[str, int]) -> dict:
    """Stop the run in order (control=stop: workers send what they hold; then the learner drains),
    and compute the figures."""
    node = fleet.primary_name()
    admin = fleet.admin(node)
    status.set_control(admin, keys, "stop")
    for name, p in fleet.procs.items():
        if name.startswith(("synthetic-", "worker-")):
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                fleet.exited.setdefault(name, -999)  # did not stop: counted
    learner = fleet.procs["learner"]
    learner.send_signal(signal.SIGTERM)
    try:
        learner.wait(180)
    except subprocess.TimeoutExpired:
        fleet.exited.setdefault("learner", -999)
    published, blob, learner_end, publish_s = {}, 0, {}, []
    published_log = fleet.work / "published.jsonl"
    for line in (published_log.read_text().splitlines() if published_log.exists() else []):
        d = json.loads(line)
        if "version" in d and "published" in d:
            published[d["version"]] = d["published"]
            blob = d["bytes"]
            publish_s.append(d["publish_s"])
        elif "stopped" in d:
            learner_end = d
    held, synthetic_out = held_versions(fleet)
    synthetic_cpu_s = synthetic_out.pop("", {}).get("process_cpu_s", 0.0)
    workers = fleet.synthetic_ids + fleet.real_ids
    end_window = killed.get("killed_at", stop_t)
    delays = version_delays(held, published, window_start, end_window - 10, workers)
    copies = {f"h{h}": logged_versions(fleet.work / f"relay-h{h}.log", "version") for h in range(args.hosts)}
    copy_delays = version_delays(copies, published, window_start, end_window - 10, list(copies))
    after_copy = after_host_copy(held, copies, published, window_start, end_window - 10, fleet)
    acc = status.read_accounting(admin, keys)
    in_stream = sum(status.stream_positions(admin, keys, w) for w in status.read_roster(admin, keys))
    settled = sum(acc[k] for k in ("trained_positions", "stale_positions", "rejected_positions", "duplicate_positions"))
    beats = {b["id"]: b for b in status.read_workers(admin, keys)}
    producers = status.read_producers(admin, keys)
    told = sum(d["sent_positions"] for d in synthetic_out.values()) + sum(
        int(beats.get(w, {}).get("positions", 0)) for w in fleet.real_ids)
    real_exact = all(int(beats.get(w, {}).get("positions", -1)) == producers.get(w, {}).get("positions", -2) +
                     producers.get(w, {}).get("lost_positions", 0) for w in fleet.real_ids) and in_stream == 0
    fetch_wall = [x for d in synthetic_out.values() for x in d.get("fetch_wall_s", [])]
    fetch_cpu = [x for d in synthetic_out.values() for x in d.get("fetch_cpu_s", [])]
    versions_seen = [s.version for s in samples]
    monotonic_held = all(all(a[0] < b[0] for a, b in zip(h, h[1:])) for h in held.values())
    pre = window_figures(samples, window_start, end_window, fleet, published, blob)
    result = {
        "hosts": args.hosts, "workers": fleet.n_workers, "synthetic_workers": len(fleet.synthetic_ids),
        "real_workers": args.real_workers, "minutes": args.minutes, "version_every_s": args.version_every,
        "link": args.link, "fanout": args.fanout, "positions_per_s_per_synthetic_worker": args.positions_per_s,
        "blob_bytes": blob, "versions_published": len(published),
        "egress_per_version_blobs": pre.get("egress_per_version_blobs"),
        "egress_per_version_blobs_info": pre.get("egress_per_version_blobs_info"),
        "egress_mbit_per_s": pre.get("egress_mbit_per_s"), "primary_cpu_share": pre.get("primary_cpu_share"),
        "version_p95_s": _round(percentile(delays, 0.95)), "version_p50_s": _round(percentile(delays, 0.5)),
        "version_max_s": _round(max(delays) if delays else None), "never_held_pairs": sum(map(math.isinf, delays)),
        "share_within_2s": round(sum(d <= 2.0 for d in delays) / len(delays), 4) if delays else None,
        "version_pairs": len(delays),
        "host_copy_p95_s": _round(percentile(copy_delays, 0.95)) if args.fanout == "relay" else None,
        "host_copy_max_s": _round(max(copy_delays)) if args.fanout == "relay" and copy_delays else None,
        "after_host_copy_p50_s": _round(percentile(after_copy, 0.5)),
        "after_host_copy_p95_s": _round(percentile(after_copy, 0.95)),
        "primary_clients_max": max((s.clients for s in samples), default=0),
        "commands_per_worker_per_s": pre.get("commands_per_worker_per_s"),
        "commands_top": top_commands(stats_at, "start", "kill" if killed else "stop", fleet.n_workers),
        "window": pre,
        "lost_positions": told - acc["produced_positions"], "told_positions": told,
        "lost_positions_counted": acc["worker_lost_positions"], "lost_batches_counted": acc["worker_lost_batches"],
        "lost_exact": told - acc["produced_positions"] == acc["worker_lost_positions"],
        "lost_reasons": sorted({p["lost_reason"].split(": ", 1)[-1] for p in producers.values()
                                if p.get("lost_reason")})[:3],
        "balanced": acc["produced_positions"] == settled + in_stream, "positions_in_stream": in_stream,
        "accounting": acc, "real_positions_exact": real_exact,
        "versions_monotonic": all(a <= b for a, b in zip(versions_seen, versions_seen[1:])) and monotonic_held,
        "workers_held_monotonic": monotonic_held,
        "synthetic_errors": sorted({d["error"] for d in synthetic_out.values() if d["error"]})[:5],
        "synthetic_cpu_s": round(synthetic_cpu_s, 1),
        "synthetic_cpu_s_per_version_per_worker": round(synthetic_cpu_s / max(1, len(published)) / max(1, len(
            fleet.synthetic_ids)), 4),
        "fetch_wall_ms_p50": _ms(percentile(fetch_wall, 0.5)), "fetch_wall_ms_p95": _ms(percentile(fetch_wall, 0.95)),
        "fetch_cpu_ms_p50": _ms(percentile(fetch_cpu, 0.5)), "fetch_cpu_ms_p95": _ms(percentile(fetch_cpu, 0.95)),
        "publish_s_p50": _round(percentile(publish_s, 0.5)), "publish_s_max": _round(max(publish_s, default=None)),
        "learner": learner_end, "machine": {"cpus": os.cpu_count(), "load_at_end": os.getloadavg()[0]},
    }
    if args.failover:
        after_t0 = killed["killed_at"] + killed["failover_s"] + 10 if killed else stop_t
        result.update({
            "failovers": len({s.node for s in samples}) - 1,
            "exited_processes": sorted(exited_before_stop),
            "failover": killed,
            "after_failover": window_figures(samples, after_t0, stop_t, fleet, published, blob),
            "versions_went_back": [(a, b) for a, b in zip(versions_seen, versions_seen[1:]) if b < a],
            "losses": [f for _, f in status.read_stream(admin, keys.losses)],
        })
    else:
        result["exited_processes"] = sorted(exited_before_stop)
    return result


def top_commands(stats_at, a: str, b: str, workers: int, n: int = 8) -> dict[str, float]:
    if a not in stats_at or b not in stats_at:
        return {}
    (t0, s0), (t1, s1) = stats_at[a], stats_at[b]
    per = {k: (v - s0.get(k, 0)) / workers / max(t1 - t0, 1e-9) for k, v in s1.items()}
    return {k: round(v, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:n] if v > 0}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def _round(x: float | None) -> float | None:
    """Rounded to ms; None for none, or for infinity (a worker that never held the version:
    counted in ``never_held_pairs``)."""
    return None if x is None or math.isinf(x) else round(x, 3)


def budget_s(args: argparse.Namespace) -> int:
    """The script's own time limit: start-up (<= 5 min), the run, the stop (<= 6 min)."""
    return int(300 + args.minutes * 60 + 360)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--hosts", type=int, default=8, help="worker hosts (namespaces)")
    p.add_argument("--synthetic-per-host", type=int, default=50, help="synthetic workers on each host")
    p.add_argument("--real-workers", type=int, default=1, help="real workers (python -m workers), spread over the hosts")
    p.add_argument("--real-games", type=int, default=2, help="games each real worker plays at once")
    p.add_argument("--minutes", type=float, default=5.0, help="length of the run (before the stop)")
    p.add_argument("--version-every", type=float, default=5.0, help="seconds between weights versions")
    p.add_argument("--link", default="1gbit", help="tc rate of the Redis hosts' egress (e.g. 1gbit, 100mbit)")
    p.add_argument("--failover", action="store_true", help="a standby and three Sentinels; kill -9 the primary half-way")
    p.add_argument("--replication-pause", type=float, default=0.0, metavar="S",
                   help="with --failover: the standby stops applying the replication stream S seconds before the "
                   "kill (CLIENT PAUSE WRITE on it), so the primary's last acknowledged writes are lost")
    p.add_argument("--fanout", choices=("relay", "replica"), default="relay",
                   help="each host's read-only copy: keisei relay (default) or a replica of the primary")
    p.add_argument("--positions-per-s", type=float, default=10.0, help="experience of each synthetic worker")
    p.add_argument("--batch-positions", type=int, default=512, help="positions in each synthetic worker's entries")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds after the first version before the window")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print its path")
    args = p.parse_args(argv)
    why = netns.require_root_net()
    if why:
        print(json.dumps({"error": why}))
        return 2
    netns.remove_stale()

    def stopped(signum, frame):
        raise Stopped(f"signal {signum}")

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGALRM, stopped)
    signal.alarm(budget_s(args))
    work = Path(tempfile.mkdtemp(prefix="kfleet-"))
    net = netns.Net()
    fleet = Fleet(args, net, work)
    code = 1
    try:
        result = run(args, fleet)
        print(json.dumps(result), flush=True)
        code = 0
    except (Stopped, KeyboardInterrupt) as exc:
        print(json.dumps({"error": f"stopped: {exc}", "work": str(work)}), flush=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up below is not interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        fleet.stop()
        net.close()
        if args.keep or code:
            print(f"fleet: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
