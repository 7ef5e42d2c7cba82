"""A worker's credential harms nothing but its own positions (issue 23), on the real server the
suite runs against (``KEISEI_REDIS_SERVER``: Redis 6.2, 7.0, Valkey), as the workers' own users:
every attack of the issue is refused or confined to the attacker's own stream while an honest
worker loses nothing; the credit holds an honest worker back and a worker that ignores it is read
no faster; request-size limits; the private Redis never outlives ``keisei run``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from keisei_stream.ops import acl
from keisei_stream.ops.embedded_redis import start_redis
from keisei_stream.wire.client import connect
from keisei_stream.wire.consumer import Consumer
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import read_confined, read_worker_accounting, register_workers, write_worker_heartbeat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attack import ATTACKS, MUST_BE_REFUSED, attack  # noqa: E402 - the attacks benchmarks/attack.py makes

pytestmark = pytest.mark.redis
RUN = "confine"
K = Keys(RUN)


@pytest.fixture
def users(real_redis, redis_server):
    """role -> URL of its user (``worker:w0`` honest, ``worker:w1`` the attacker), both on the roster."""
    passwords = acl.create_users(real_redis, RUN, ["w0", "w1"])
    register_workers(real_redis, K, ["w0", "w1"])
    yield {role: acl.user_url(redis_server.url, acl.username(RUN, role), pw) for role, pw in passwords.items()}
    for role in passwords:
        real_redis.execute_command("ACL", "DELUSER", acl.username(RUN, role))


def _learner(url: str, **kw) -> Consumer:
    opts = dict(max_plies=64, window=8, block_ms=20, count=8, claim_idle_ms=60_000, refresh_s=0.1)
    opts.update(kw)
    return Consumer(connect(url), K, "learner-0", **opts)


def test_each_attack_is_refused_or_confined_and_the_honest_worker_loses_nothing(users, real_redis, make_batch):
    """Issue 23's attacks with w1's own credential while w0 and w1's own process produce and a
    learner (the learner's user) reads, trains and acknowledges: w0's accounting is exact, w1's
    stream is reset after its ids were exhausted and its honest process goes on."""
    c = _learner(users["learner"])
    c.claim_epoch()
    assert c.credit == {"w0": 4, "w1": 4}
    stop = threading.Event()
    errors: list[BaseException] = []
    sent = {"w0": 0, "w1": 0}

    def produce(w: str) -> None:
        try:
            p = Producer(connect(users[f"worker:{w}"]), K, w, backoff_max_s=0.05)
            i = 0
            while not stop.is_set():
                if p.send(make_batch(40, seed=i % 8, worker_id=w), should_stop=stop.is_set):
                    sent[w] += 1
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(w,)) for w in ("w0", "w1")]
    for t in threads:
        t.start()

    def learn(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = c.read()
            if got:
                c.ack(got, sum(d.batch.num_positions for d in got), 0)

    learn(1.0)
    outcomes = {}
    for i, name in enumerate(a for a in ATTACKS if a != "big_request"):  # (the suite's server has no request limit)
        t0 = time.monotonic()
        outcomes[name] = attack(name, users["worker:w1"], K, seed=i)
        assert time.monotonic() - t0 < 20, f"{name} held the attacker's connection"  # no endless script ran
        learn(1.5)
    w0_before = sent["w0"]
    learn(3.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sent["w0"] > w0_before, "the honest worker stopped producing"
    deadline = time.monotonic() + 30
    while sum(c.lengths().values()) - len(c.in_flight) > 0 and time.monotonic() < deadline:
        learn(0.5)
    learn(0.5)
    for name, out in outcomes.items():
        assert out["outcome"] == ("refused" if name in MUST_BE_REFUSED else "confined"), out
    per = read_worker_accounting(real_redis, K)
    w0, w1 = per["w0"], per["w1"]
    assert w0["produced_batches"] == sent["w0"] and w0["unsettled_positions"] == 0 and w0["rejected_entries"] == 0
    assert w0["trained_positions"] == w0["produced_positions"] > 0
    confined = read_confined(real_redis, K)["w1"]
    assert confined["future_ids"] >= 1 and confined["stream_resets"] >= 1  # the largest id: w1's stream reset
    assert confined["overruns"] >= 1  # 40 entries past its credit
    assert w1["rejected_entries"] >= 20  # garbage and the trims' own entries, dead-lettered
    assert "w0" not in read_confined(real_redis, K)
    assert sent["w1"] > 0 and c.stats["stream_resets"] >= 1
    # keisei status shows it per worker
    from rich.console import Console

    from keisei_stream.cli.status import collect_status, render_status
    st = collect_status(real_redis, RUN)
    assert st["roster"] == ["w0", "w1"] and st["per_worker"]["w0"]["credit"] == 4
    assert st["per_worker"]["w1"]["stream_resets"] >= 1 and st["per_worker"]["w0"]["unsettled_positions"] == 0
    console = Console(width=200, record=True)
    console.print(render_status(st))
    text = console.export_text()
    assert "what its credential did to its own keys" in text and "over credit" in text


def test_a_worker_ignoring_its_credit_is_read_no_faster(users, real_redis, make_batch):
    """w1 piles 30 valid entries into its own stream; the learner holds at most its quota (plus one
    read) of them at a time, keeps reading w0's, and counts the overrun."""
    c = _learner(users["learner"], window=4, count=4, refresh_s=60)  # refreshed by hand below
    assert c.credit == {"w0": 2, "w1": 2}
    w1 = connect(users["worker:w1"])
    pipe = w1.pipeline(transaction=False)
    for i in range(30):
        b = make_batch(40, seed=i % 8, worker_id="w1", batch_id=f"w1:flood:{i}")
        from keisei_stream.wire.codec import encode_batch
        pipe.xadd(K.experience("w1"), encode_batch(b))
    pipe.execute()
    p0 = Producer(connect(users["worker:w0"]), K, "w0")
    assert p0.send(make_batch(40, seed=1, worker_id="w0")) and p0.send(make_batch(40, seed=2, worker_id="w0"))
    got = []
    for _ in range(5):
        got += c.read()
    held = {w: sum(1 for d in got if d.worker == w) for w in ("w0", "w1")}
    assert held["w0"] == 2 and held["w1"] <= 2 + 4  # its quota, and at most one read (count 4) past it
    c.refresh(force=True)
    assert read_confined(real_redis, K)["w1"]["overruns"] == 1
    assert not p0.room()  # w0 holds its credit: it waits, as the learner has not trained its entries
    c.ack(got, sum(d.batch.num_positions for d in got), 0)
    assert p0.room()


def test_the_credit_is_the_window_shared_by_the_live_workers(users, real_redis):
    c = _learner(users["learner"], window=9)
    assert c.credit == {"w0": 5, "w1": 5}  # no heartbeat yet: the whole roster shares it
    write_worker_heartbeat(real_redis, K, "w0", {"state": "playing"}, ttl_s=30)
    c.refresh(force=True)
    assert c.live == {"w0"} and c.credit == {"w0": 9, "w1": 9}
    assert real_redis.hgetall(K.credit) == {b"w0": b"9", b"w1": b"9"}
    write_worker_heartbeat(real_redis, K, "w1", {"state": "playing"}, ttl_s=30)
    c.refresh(force=True)
    assert c.credit == {"w0": 5, "w1": 5}


def test_a_live_worker_that_sends_nothing_holds_the_learner_back_only_for_a_while(users, real_redis, make_batch):
    """w0 holds its credit, w1 is alive but sends nothing: after ``stall_s`` the learner trains what
    it holds instead of waiting for w1 forever."""
    for w in ("w0", "w1"):
        write_worker_heartbeat(real_redis, K, w, {"state": "playing"}, ttl_s=30)
    c = _learner(users["learner"], window=4, stall_s=1.0)
    p0 = Producer(connect(users["worker:w0"]), K, "w0")
    assert p0.send(make_batch(40, seed=1, worker_id="w0")) and p0.send(make_batch(40, seed=2, worker_id="w0"))
    c.receive()
    c.receive()
    assert len(c.held) == 2 and not c.backlog_full  # w1 may still send
    time.sleep(1.1)
    c.receive()
    assert c.backlog_full
    assert [len(g) for g in c.take_updates(10_000)] == [2]


def test_a_request_above_the_limit_is_refused_and_honest_entries_pass(tmp_path):
    server = start_redis(tmp_path, maxmemory="64mb", max_request_bytes=1 << 20)
    try:
        r = connect(server.url)
        assert int(r.config_get("proto-max-bulk-len")["proto-max-bulk-len"]) == 1 << 20
        assert int(r.config_get("client-query-buffer-limit")["client-query-buffer-limit"]) == 2 << 20
        r.xadd("s", {"d": os.urandom(800_000)})  # under the limit
        big = connect(server.url, retry=None)
        with pytest.raises((redis.ConnectionError, redis.ResponseError)):
            big.xadd("s", {"d": os.urandom(3 << 20)})
        assert r.xlen("s") == 1 and r.ping()  # the server and everyone else go on
    finally:
        server.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start_run(tmp_path: Path, run: str, *options: str) -> tuple[subprocess.Popen, redis.Redis, int]:
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run",
           run, "--workers", "1", "--no-live", "--print-every", "5", "--set", f"run.dir={tmp_path}", *options]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(tmp_path / f"{run}.out", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = tmp_path / run / "redis.url"
    deadline = time.monotonic() + 120
    while not url.exists():
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / f"{run}.out").read_text()
        time.sleep(0.2)
    r = connect(url.read_text().strip())
    deadline = time.monotonic() + 120
    while int(r.hget(Keys(run).weights_latest, "version") or 0) < 1:
        assert time.monotonic() < deadline, "no version 1"
        time.sleep(0.2)
    return proc, r, int(r.info("server")["process_id"])


@pytest.mark.slow
def test_keisei_run_stops_on_a_busy_server_and_leaves_no_redis(tmp_path):
    """An admin's endless script makes the private Redis answer BUSY to everyone and defer SIGTERM:
    ``keisei run`` still stops (its stop path says why, no traceback) and kills its Redis."""
    # (a learner blocked in a read on the busy server waits for its socket timeout: not waited for here)
    proc, r, redis_pid = _start_run(tmp_path, "busy", "--learner-stop-timeout", "5")
    try:
        url = (tmp_path / "busy" / "redis.url").read_text().strip()
        threading.Thread(target=_eval_forever, args=(url,), daemon=True).start()
        time.sleep(7.0)  # past busy-reply-threshold (5 s): every other client now gets BUSY
        proc.send_signal(signal.SIGINT)
        assert proc.wait(180) in (0, 1)
        out = (tmp_path / "busy.out").read_text()
        assert "Traceback" not in out, out[-3000:]
        assert "killed" in out and not _pid_alive(redis_pid)
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=False)


def _eval_forever(url: str) -> None:
    """An admin's endless script, on a client that gives up when the server goes (no retries: it
    must not go on waiting for the killed server, counted as an outage of this test process)."""
    r = connect(url, retry=Retry(NoBackoff(), 0))
    try:
        r.eval("while true do end", 0)
    except (redis.RedisError, OSError):
        pass


@pytest.mark.slow
def test_a_killed_keisei_run_takes_its_redis_with_it(tmp_path):
    """kill -9 of ``keisei run`` itself: its private Redis (parent-death signal SIGKILL) and its
    children (SIGTERM) do not outlive it."""
    proc, r, redis_pid = _start_run(tmp_path, "orphan")
    try:
        r.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while _pid_alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pid_alive(redis_pid), "the private Redis outlived keisei run"
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=False)
