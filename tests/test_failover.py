"""Failover through Redis Sentinel on real processes: a primary, a replica and three Sentinels on
127.0.0.1, the run's users on both nodes, a learner and a worker that connect through the
Sentinels; the primary is killed with SIGKILL and the run carries on with the promoted replica."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from keisei_stream.cli.main import main
from keisei_stream.ops.embedded_redis import RedisServer, start_redis, start_sentinel
from keisei_stream.wire import atomic
from keisei_stream.wire import status as S
from keisei_stream.wire.client import SentinelURL, connect, parse_sentinel_url
from keisei_stream.wire.keys import Keys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from procs import assert_accounting_balances, start_learner, start_worker, stop_all, wait_for  # noqa: E402

ADMIN = "admin-pw"
SERVICE = "keisei"


def test_sentinel_urls_parse_and_bad_ones_name_the_problem():
    assert parse_sentinel_url("redis+sentinel://u:p%40w@10.0.0.1:26380,h2,[::1]:26381/keisei/2?sentinel_password=s") == \
        SentinelURL((("10.0.0.1", 26380), ("h2", 26379), ("::1", 26381)), "keisei", 2, "u", "p@w", False,
                    {"password": "s"})
    assert parse_sentinel_url("rediss+sentinel://h/k").ssl
    for bad, why in [("redis+sentinel://h", "SERVICE"), ("redis+sentinel://h:0/k", "bad Sentinel address"),
                     ("redis+sentinel://h/k?ssl=1", "unknown query"), ("redis://h/k", "not a Sentinel URL"),
                     ("redis+sentinel://h/k/x", "SERVICE"), ("redis+sentinel:///k", "SERVICE")]:
        with pytest.raises(ValueError, match=why):
            parse_sentinel_url(bad)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Group:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]
    ports: list[int]

    def admin_url(self, port: int) -> str:
        return f"redis://:{ADMIN}@127.0.0.1:{port}/0"

    def sentinel_url(self, user: str = "", password: str = ADMIN) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports[2:])
        return f"redis+sentinel://{user}:{password}@{hosts}/{SERVICE}/0"


@pytest.fixture
def group(tmp_path):
    """A primary and its replica (admin password, TCP on 127.0.0.1) and three Sentinels (quorum 2,
    the primary is down after 1 s of silence)."""
    ports = _free_ports(5)
    common = ["--bind", "127.0.0.1", "--requirepass", ADMIN, "--masterauth", ADMIN,
              "--repl-diskless-sync-delay", "0"]  # the replica's first sync at once, not 5 s later
    primary = start_redis(tmp_path / "primary", extra_args=["--port", str(ports[0]), *common])
    servers = [primary]
    try:
        replica = start_redis(tmp_path / "replica", extra_args=["--port", str(ports[1]), *common,
                                                                "--replicaof", "127.0.0.1", str(ports[0])])
        servers.append(replica)
        for i, port in enumerate(ports[2:]):
            servers.append(start_sentinel(tmp_path / f"sentinel{i}", SERVICE, ("127.0.0.1", ports[0]), port=port,
                                          bind="127.0.0.1", auth_pass=ADMIN, down_after_ms=1000,
                                          failover_timeout_ms=5000))
        r = connect(f"redis://:{ADMIN}@127.0.0.1:{ports[1]}/0")
        wait_for(lambda: r.info("replication").get("master_link_status") == "up", 30, "the replica in sync")
        r.close()
        yield Group(primary, replica, servers[2:], ports)
    finally:
        for s in servers:
            s.stop()


@pytest.mark.redis
def test_wait_returns_the_replicas_that_hold_a_write(group, real_redis):
    keys = Keys("waitrun")
    primary = connect(group.admin_url(group.ports[0]))
    assert atomic.run_atomic(primary, keys, [("SET", keys.control, "run")], None, wait=(1, 5000)) == 1
    assert connect(group.admin_url(group.ports[1])).get(keys.control) == b"run"
    before = atomic.UNREPLICATED.count
    t0 = time.monotonic()
    assert atomic.run_atomic(real_redis, keys, [("SET", keys.control, "run")], None, wait=(1, 300)) == 0  # no replica
    assert time.monotonic() - t0 >= 0.29 and atomic.UNREPLICATED.count == before + 1 and atomic.UNREPLICATED.short
    t0 = time.monotonic()  # after a shortfall: a short WAIT until one is met again
    assert atomic.run_atomic(real_redis, keys, [("SET", keys.control, "run")], None, wait=(1, 300)) == 0
    assert time.monotonic() - t0 < 0.25 and atomic.UNREPLICATED.count == before + 2
    assert atomic.run_atomic(primary, keys, [("SET", keys.control, "run")], None, wait=(1, 5000)) == 1
    assert not atomic.UNREPLICATED.short
    assert atomic.run_atomic(real_redis, keys, [("SET", keys.control, "pause")], None) is None


@pytest.mark.redis
def test_what_a_promoted_replica_lacks_is_recorded_in_losses(real_redis, make_batch):
    """After an outage with the epoch intact, the consumer compares the server with what the
    learner last read: a weights version and produced positions it lacks are recorded (one
    ``losses`` entry, kind failover); a server that lacks nothing gets no entry."""
    from keisei_stream.wire.consumer import Consumer
    from keisei_stream.wire.producer import Producer
    from keisei_stream.wire.weights import publish_weights

    keys = Keys("promoted")
    consumer = Consumer(real_redis, keys, "learner-0", max_plies=64)
    consumer.claim_epoch()
    Producer(real_redis, keys, "w0", credit=10).send(make_batch(100, worker_id="w0"))
    publish_weights(real_redis, keys, 3, b"v3", "float32", keep=2)
    held = S.read_accounting(real_redis, keys)
    assert consumer.record_failover(held, 3) == 3 and real_redis.xlen(keys.losses) == 0
    before = {**held, "produced_positions": held["produced_positions"] + 40, "produced_batches": 2}
    assert consumer.record_failover(before, 5) == 3  # v4, v5 and one batch of 40 never reached this server
    (_, entry), = S.read_stream(real_redis, keys.losses)
    assert entry["kind"] == "failover" and entry["version_held"] == "5" and entry["version_found"] == "3"
    assert entry["produced_positions_missing"] == "40" and entry["produced_batches_missing"] == "1"


@pytest.mark.redis
def test_adds_a_failover_lost_are_counted_in_the_worker_s_record(real_redis, make_batch):
    """The server goes back to a consistent prefix of what it acknowledged (a promoted replica that
    lacked the last two adds: their entries and the record that counted them); with the run's
    epoch unchanged the producer counts them as lost in its record, once, whether it looks after
    the outage (``reconcile``) or at its next add; with another epoch (the run's data lost, the
    learner's business) it counts nothing."""
    from keisei_stream.wire.atomic import EpochWatch
    from keisei_stream.wire.producer import Producer

    keys = Keys("lostadds")
    real_redis.set(keys.epoch, "e1")
    record, stream = keys.producer("w0"), keys.experience("w0")
    p = Producer(real_redis, keys, "w0", credit=100, epoch=EpochWatch("e1"))

    def go_back(to_record, ids) -> None:  # what the promoted replica holds: the record and entries before
        real_redis.xadd(record, to_record, maxlen=1, approximate=False)
        if ids:
            real_redis.xdel(stream, *ids)

    b = [make_batch(64, seed=seed, worker_id="w0") for seed in range(6)]
    n = [x.num_positions for x in b]
    assert p.send(b[0])
    first = real_redis.xrevrange(record, count=1)[0][1]
    assert p.send(b[1]) and p.send(b[2])
    go_back(first, [i for i, _ in real_redis.xrange(stream)][1:])
    assert p.reconcile() == n[1] + n[2] and p.reconcile() == 0
    rec = S.read_producers(real_redis, keys)["w0"]
    assert (rec["positions"], rec["batches"], rec["lost_positions"], rec["lost_batches"]) == (n[0], 1, n[1] + n[2], 2)
    assert "failover" in rec["lost_reason"] and f"2 / {n[1] + n[2]} fewer" in rec["lost_reason"]
    assert p.send(b[3])  # acknowledged in all: what the server holds + what was lost
    assert S.read_producers(real_redis, keys)["w0"]["positions"] == n[0] + n[3] and p.lost_positions == n[1] + n[2]
    # found at the next add, in the same transaction, when nobody looked after the outage
    held = real_redis.xrevrange(record, count=1)[0][1]
    assert p.send(b[4])
    go_back(held, [i for i, _ in real_redis.xrange(stream)][-1:])
    assert p.send(b[5])
    acc = S.read_accounting(real_redis, keys)
    assert (acc["produced_positions"], acc["worker_lost_positions"], acc["worker_lost_batches"]) == \
        (n[0] + n[3] + n[5], n[1] + n[2] + n[4], 3)
    assert acc["produced_positions"] + acc["worker_lost_positions"] == sum(n)  # what the worker was told
    # another epoch: the server lost the whole run (the learner records that); nothing counted here
    real_redis.set(keys.epoch, "e2")
    go_back(first, [])
    assert p.reconcile() == 0 and S.read_producers(real_redis, keys)["w0"]["lost_positions"] == 0


@pytest.mark.redis
def test_a_command_cut_by_the_kill_of_the_primary_ends_on_the_promoted_replica(group):
    """A client blocked in a command when the primary dies (the learner's ``XREADGROUP BLOCK``)
    reconnects to the promoted replica, not to the dead address for ever (redis-py's own Sentinel
    connection would, under the retry policy that never gives up: :class:`SentinelConnection`)."""
    c = connect(group.sentinel_url())
    c.xgroup_create("s", "g", id="0", mkstream=True)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(c.xreadgroup("g", "me", {"s": ">"}, count=1, block=60_000)),
                              daemon=True)
    reader.start()
    time.sleep(1.0)  # blocked on the primary
    os.kill(group.primary.pid, signal.SIGKILL)
    promoted = connect(group.admin_url(group.ports[1]))
    wait_for(lambda: promoted.info("replication")["role"] == "master", 60, "the replica's promotion")
    wait_for(lambda: promoted.client_list(_type="normal") and any(
        cl.get("cmd") == "xreadgroup" for cl in promoted.client_list()), 30, "the blocked read on the new primary")
    promoted.xadd("s", {"x": "1"})
    reader.join(10)
    assert got and got[0][0][1][0][1] == {b"x": b"1"}


@pytest.mark.redis
@pytest.mark.slow
def test_kill_9_of_the_primary_fails_over_and_the_run_carries_on(group, tmp_path, capsys):
    """The issue's failover acceptance on one machine: learner and worker reach the primary
    through the Sentinels as the run's users (created on both nodes); the replica stops applying
    the replication stream (``CLIENT PAUSE ... WRITE`` on it: it still reads the stream, as a
    replica on a slow link would, and drops what it did not apply when the link breaks) while the
    worker's adds go on, then the primary is killed -9. The replica is promoted, both processes
    carry on (none exits), the versions the workers can see never go back for longer than the
    learner takes to publish again (and any such step is recorded in ``losses``), the adds the
    old primary acknowledged and never replicated are counted exactly in the worker's record
    (what the worker was told = what the new primary holds + what it counted lost, and not 0),
    ``keisei status`` shows them with their reason, and the accounting balances on the new primary."""
    from keisei_stream.cli.status import collect_status

    run = "failover"
    keys = Keys(run)
    assert main(["users", "--redis", group.admin_url(group.ports[0]), "--redis", group.admin_url(group.ports[1]),
                 "--run", run, "--workers", "1", "--url", group.sentinel_url()]) == 0
    urls = dict(line.split()[0:3:2] for line in capsys.readouterr().out.splitlines())
    admin = connect(group.sentinel_url())
    S.set_control(admin, keys, "run")
    learner = start_learner(urls["learner"], run, tmp_path, "--set", "stream.wait_replicas=1",
                            "--set", "stream.wait_ms=500")
    worker = start_worker(urls["worker:w0"], run, tmp_path, "w0")
    procs = [learner, worker]
    seen: list[tuple[float, int]] = []
    sampling = threading.Event()

    def version() -> int:
        v = admin.hget(keys.weights_latest, "version")
        return int(v) if v is not None else 0

    def sample() -> None:
        while not sampling.is_set():
            seen.append((time.monotonic(), version()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    primary, replica = connect(group.admin_url(group.ports[0])), connect(group.admin_url(group.ports[1]))

    def acknowledged() -> int:  # the worker's batches as the primary holds them
        return S.read_producers(primary, keys).get("w0", {}).get("batches", 0)

    try:
        wait_for(lambda: version() >= 3 and acknowledged() >= 2, 180, "versions and adds before the failover", procs)
        sampler.start()
        replica.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # the replica stops applying the stream
        before = acknowledged()
        wait_for(lambda: acknowledged() >= before + 2, 30, "adds the replica does not apply", procs)
        os.kill(group.primary.pid, signal.SIGKILL)
        time.sleep(0.5)  # the replica has seen its link break: what it did not apply is gone
        replica.execute_command("CLIENT", "UNPAUSE")  # (a paused replica is no candidate for promotion)
        wait_for(lambda: replica.info("replication")["role"] == "master", 60, "the replica's promotion", procs)
        v = version()
        wait_for(lambda: version() >= v + 3 and S.read_producers(replica, keys)["w0"]["lost_batches"] >= 2, 180,
                 "versions after the failover, the lost adds counted", procs)
        sampling.set()
        sampler.join()
        shown = collect_status(admin, run)
        stop_all(admin, keys, [worker], learner)  # both still running, and they stop cleanly
    finally:
        sampling.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert group.primary.process.poll() is not None
    losses = [f for _, f in S.read_stream(admin, keys.losses)]
    went_back = [(t, a, b) for (t, a), (_, b) in zip(seen, seen[1:]) if b < a]
    if went_back:  # the last version's replication was cut: the learner published it again at once
        assert any(f.get("kind") == "failover" and int(f["version_found"]) < int(f["version_held"]) for f in losses)
        t, high, _ = went_back[0]
        assert any(tt > t and vv >= high for tt, vv in seen if tt < t + 10), "the version was not published again"
    acc = assert_accounting_balances(admin, keys)  # on the promoted replica: every position it holds is settled
    assert acc["trained_positions"] > 0
    told = int(next(w for w in S.read_workers(admin, keys) if w["id"] == "w0")["positions"])  # the worker's count
    rec = S.read_producers(admin, keys)["w0"]
    assert rec["lost_batches"] >= 2 and told == rec["positions"] + rec["lost_positions"], (told, rec)
    assert acc["worker_lost_positions"] == rec["lost_positions"] and "failover" in rec["lost_reason"]
    assert shown["per_worker"]["w0"]["worker_lost_positions"] > 0 and "failover" in shown["per_worker"]["w0"]["lost_reason"]
    assert int(S.read_learner_status(admin, keys).get("redis_outages", 0)) >= 1
    assert int(S.read_learner_status(admin, keys).get("unreplicated_writes", 0)) >= 1  # its WAITs fell short in the pause
    print(json.dumps({"losses": losses, "went_back": went_back, "accounting": acc, "record": rec, "told": told}))
