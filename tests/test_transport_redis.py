"""Transport integration tests on a real redis-server (started by the suite, see conftest)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
from conftest import MAYBE_VALID

from keisei_stream.wire.codec import encode_batch
from keisei_stream.wire.atomic import EpochChanged
from keisei_stream.wire.consumer import Consumer, ensure_group
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import read_accounting, read_worker_accounting, register_workers, stream_info
from keisei_stream.wire.weights import (
    WeightsError,
    WeightsWatcher,
    publish_weights,
    read_latest_weights,
)

pytestmark = pytest.mark.redis

K = Keys("integ")


def consumer(r, name="L1", workers=("w1",), **kw):
    """A consumer of the run's ``workers`` (put on the roster first)."""
    register_workers(r, K, list(workers))
    opts = dict(max_plies=64, block_ms=50, count=8, claim_idle_ms=60_000, deadletter_maxlen=10_000, window=64)
    opts.update(kw)
    return Consumer(r, K, name, **opts)


def balanced(acc):
    return acc["produced_positions"] == (acc["trained_positions"] + acc["stale_positions"]
                                         + acc["rejected_positions"] + acc["duplicate_positions"])


def drain(c, r, ack=True, limit_s=30.0):
    """Read until the streams are empty; returns every delivered entry."""
    out = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        got = c.read()
        if ack and got:
            c.ack(got, sum(d.batch.num_positions for d in got), 0)
        out += got
        if not got and sum(c.lengths().values()) - len(c.in_flight) == 0:
            break
    return out


def test_concurrent_producers_keep_their_credit_and_account_everything(redis_server, real_redis, make_batch):
    window, producers, per_producer = 16, 8, 6
    workers = [f"w{i}" for i in range(producers)]
    batches = [make_batch(60, seed=i, worker_id=f"w{i}") for i in range(producers)]
    stop_monitor = threading.Event()
    peak = dict.fromkeys(workers, 0)
    errors: list[BaseException] = []
    c = consumer(real_redis, workers=workers, window=window)  # no heartbeats: the roster shares the window
    assert c.credit == dict.fromkeys(workers, 2)

    def monitor():
        r = connect(redis_server.url)
        while not stop_monitor.is_set():
            for w in workers:
                peak[w] = max(peak[w], r.xlen(K.experience(w)))
            time.sleep(0.002)

    def produce(i):
        try:
            r = connect(redis_server.url)
            p = Producer(r, K, f"w{i}", backoff_max_s=0.02)
            for _ in range(per_producer):
                assert p.send(batches[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    mon = threading.Thread(target=monitor)
    mon.start()
    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for t in threads:
        t.start()
    delivered = []
    deadline = time.monotonic() + 60
    while len(delivered) < producers * per_producer and time.monotonic() < deadline:
        got = c.read()
        time.sleep(0.01)  # a slow learner
        for d in got:  # half trained, half stale
            n = d.batch.num_positions
            c.ack([d], trained_positions=n // 2, stale_positions=n - n // 2)
        delivered += got
    for t in threads:
        t.join(30)
    stop_monitor.set()
    mon.join()
    assert not errors, errors
    assert max(peak.values()) <= 2  # each worker alone adds to its stream: never one over its credit
    assert len(delivered) == producers * per_producer
    assert len({d.batch.batch_id for d in delivered}) == producers * per_producer
    acc = read_accounting(real_redis, K)
    assert acc["produced_batches"] == producers * per_producer
    assert balanced(acc) and acc["produced_positions"] == sum(b.num_positions for b in batches) * per_producer
    per = read_worker_accounting(real_redis, K)
    assert all(per[w]["unsettled_positions"] == 0 and per[w]["produced_batches"] == per_producer for w in workers)
    info = stream_info(real_redis, K)
    assert info["length"] == 0 and info["pending"] == 0 and info["streams"] == producers


def test_killed_consumer_entries_are_claimed(real_redis, make_batch):
    p = Producer(real_redis, K, "w1", credit=100)
    for i in range(5):
        p.send(make_batch(40, seed=i, worker_id="w1"))
    dead = consumer(real_redis, "dead-learner", count=3)
    lost = dead.read()  # delivered, never acknowledged: the learner was killed here
    assert len(lost) == 3
    del dead
    survivor = consumer(real_redis, "L2", claim_idle_ms=200, count=10)
    got = survivor.read()  # the two never-delivered entries (claims are not idle yet)
    survivor.ack(got, sum(d.batch.num_positions for d in got), 0)
    time.sleep(0.25)
    survivor._next_claim = 0.0
    got += drain(survivor, real_redis)
    ids = {d.batch.batch_id for d in got}
    assert {d.batch.batch_id for d in lost} <= ids and len(ids) == 5
    assert survivor.stats["claimed"] == 3
    acc = read_accounting(real_redis, K)
    assert balanced(acc) and acc["trained_positions"] == acc["produced_positions"]
    assert stream_info(real_redis, K)["pending"] == 0


def test_retried_add_is_trained_once(real_redis, make_batch):
    p = Producer(real_redis, K, "w1", credit=100)
    b = make_batch(50, worker_id="w1")
    b.batch_id = p.next_batch_id()
    fields = encode_batch(b)
    assert p._try_add(fields, b.num_positions) == "added"
    assert p._try_add(fields, b.num_positions) == "added"  # the retry after a lost reply: not added again
    real_redis.xadd(K.experience("w1"), fields)  # a raw duplicate (e.g. XADD retried by a client)
    c = consumer(real_redis)
    got = drain(c, real_redis)
    assert len(got) == 1
    acc = read_accounting(real_redis, K)
    assert acc["trained_positions"] == b.num_positions == acc["produced_positions"]
    assert acc["duplicate_positions"] == b.num_positions


def test_a_lost_connection_while_adding_adds_once(redis_server, real_redis, make_batch):
    """The connection is killed around each add (CLIENT KILL of every worker connection): whatever
    the server had done, the producer's retries add every batch exactly once."""
    r = connect(redis_server.url, client_name="victim-producer")
    p = Producer(r, K, "w1", credit=1000, backoff_max_s=0.01)
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            for c in real_redis.client_list():
                if c.get("name") == "victim-producer":
                    try:
                        real_redis.client_kill_filter(_id=c["id"])
                    except redis.ResponseError:
                        pass
            time.sleep(0.001)

    t = threading.Thread(target=killer)
    t.start()
    try:
        for i in range(30):
            assert p.send(make_batch(30, seed=i % 4, worker_id="w1"))
    finally:
        stop.set()
        t.join()
    assert p.retries > 0, "no connection was lost: the test did not test anything"
    assert real_redis.xlen(K.experience("w1")) == 30
    assert read_accounting(real_redis, K)["produced_batches"] == 30


def test_thousand_hostile_entries_dead_lettered(real_redis, make_batch, hostile_entries):
    entries = hostile_entries(1000, seed=3)  # mutations of an entry of worker w0, on w0's stream
    pipe = real_redis.pipeline(transaction=False)
    for _, fields in entries:
        if fields:
            pipe.xadd(K.experience("w0"), fields)
    pipe.execute()
    good = make_batch(60, seed=99, worker_id="w0", batch_id="w0:good:0")
    real_redis.xadd(K.experience("w0"), encode_batch(good))
    c = consumer(real_redis, count=64, workers=("w0",), window=2000)
    c.published(1000)  # what the learner sets: its newest published version
    got = drain(c, real_redis, limit_s=60)
    sent = [k for k, f in entries if f]  # an empty field map cannot be XADDed
    accepted = [d for d in got if d.batch.batch_id != "w0:good:0"]
    assert "w0:good:0" in {d.batch.batch_id for d in got}
    dead = real_redis.xlen(K.deadletter)
    acc = read_accounting(real_redis, K)
    assert dead == acc["rejected_entries"]
    # everything not accepted (only MAYBE_VALID kinds can be) was dead-lettered or a duplicate
    assert dead + acc["duplicate_entries"] + len(accepted) == len(sent)
    assert dead >= sum(1 for k in sent if k not in MAYBE_VALID)  # decoding precedes dedup
    # rejected positions are what was decoded, never an entry's claim (n_huge claims 10^11)
    real_positions = make_batch(120, max_plies=64, seed=3).num_positions
    assert acc["rejected_positions"] <= dead * real_positions
    assert real_redis.xlen(K.experience("w0")) == 0
    reasons = {f[b"reason"].split(b":")[0] for _, f in real_redis.xrange(K.deadletter, count=2000)}
    assert len(reasons) > 10


def test_pubsub_miss_recovered_by_polling(redis_server, real_redis):
    w = WeightsWatcher(connect(redis_server.url), K, poll_s=0.1)
    assert w.poll() is None
    publish_weights(real_redis, K, 1, b"v1", "float32", keep=2)
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        got = w.poll()
        time.sleep(0.01)
    assert got == 1
    # drop every pub/sub connection: what is published meanwhile is lost
    real_redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    publish_weights(real_redis, K, 2, b"v2", "float32", keep=2)
    got = None
    deadline = time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        got = w.poll()
        time.sleep(0.02)
    assert got == 2
    assert read_latest_weights(real_redis, K)[0] == 2
    w.close()


def test_wrong_sha_refused(real_redis):
    sha = publish_weights(real_redis, K, 1, b"good weights", "float32", keep=2)
    real_redis.set(K.weights_blob(sha), b"evil weights")
    with pytest.raises(WeightsError):
        read_latest_weights(real_redis, K)


def test_blocking_read_returns_new_entry(redis_server, real_redis, make_batch):
    c = consumer(real_redis, block_ms=2000)
    b = make_batch(30, worker_id="w1")

    def later():
        time.sleep(0.1)
        Producer(connect(redis_server.url), K, "w1", credit=10).send(b)

    t = threading.Thread(target=later)
    t.start()
    got = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got = c.read()
    t.join()
    assert len(got) == 1
    info = stream_info(real_redis, K)
    assert info["pending"] == 1 and info["backlog"] == 1


def test_deleted_pending_entry_is_not_dead_lettered(real_redis, make_batch):
    p = Producer(real_redis, K, "w1", credit=10)
    for i in range(3):
        p.send(make_batch(40, seed=i, worker_id="w1"))
    got = consumer(real_redis, "L1").read()
    real_redis.xdel(K.experience("w1"), got[0].entry_id)  # e.g. an operator (or MAXLEN by w1) cleaned it up
    again = consumer(real_redis, "L1").read()  # restart: own pending, one of them deleted
    assert [d.entry_id for d in again] == [d.entry_id for d in got[1:]]
    assert real_redis.xlen(K.deadletter) == 0
    assert stream_info(real_redis, K)["pending"] == 2


_VICTIM = r"""
import sys, time
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.consumer import Consumer
r = connect(sys.argv[1])
c = Consumer(r, Keys("integ"), "victim", max_plies=64, block_ms=50, count=3)
got = c.read()
print(" ".join(d.batch.batch_id for d in got), flush=True)
time.sleep(60)
"""


def test_sigkilled_consumer_process_loses_nothing(redis_server, real_redis, make_batch):

    p = Producer(real_redis, K, "w1", credit=100)
    for i in range(5):
        p.send(make_batch(40, seed=i, worker_id="w1"))
    register_workers(real_redis, K, ["w1"])
    proc = subprocess.Popen([sys.executable, "-c", _VICTIM, redis_server.url], stdout=subprocess.PIPE, text=True)
    try:
        taken = proc.stdout.readline().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(taken) == 3
    assert stream_info(real_redis, K)["pending"] == 3
    survivor = consumer(real_redis, "L2", claim_idle_ms=150, count=10)
    got = drain(survivor, real_redis)  # first the two never-delivered entries
    time.sleep(0.2)
    survivor._next_claim = 0.0
    got += drain(survivor, real_redis)
    assert len(got) == 5 and len({d.batch.batch_id for d in got}) == 5 and set(taken) <= {d.batch.batch_id for d in got}
    acc = read_accounting(real_redis, K)
    assert balanced(acc) and acc["trained_positions"] == acc["produced_positions"]
    assert stream_info(real_redis, K)["length"] == 0


def test_a_replayed_batch_is_dropped_after_a_learner_restart(real_redis, make_batch):
    """The in-memory duplicate window dies with the learner; the trained batch ids kept in Redis
    (``trained_batches``) still recognise a batch replayed by a client afterwards."""
    b = make_batch(60, seed=5, worker_id="w9", batch_id="w9:sess:0")
    fields = encode_batch(b)
    real_redis.xadd(K.experience("w9"), fields)
    first = consumer(real_redis, name="L1", workers=("w9",))
    assert len(drain(first, real_redis, limit_s=10)) == 1  # trained and acknowledged
    real_redis.xadd(K.experience("w9"), fields)  # the same bytes again, e.g. a hostile or buggy client
    restarted = consumer(real_redis, name="L1", workers=("w9",))  # fresh process: empty in-memory window
    assert drain(restarted, real_redis, limit_s=5) == []
    acc = read_accounting(real_redis, K)
    assert acc["duplicate_entries"] == 1 and acc["trained_positions"] == b.num_positions
    assert real_redis.xlen(K.experience("w9")) == 0


def test_no_acknowledgement_lands_in_a_server_that_lost_the_run(real_redis, make_batch):
    """The consumer acknowledges only while the run's epoch is the one it knows: after a restart
    without the data the counts of the old server's entries must not enter the new accounting."""
    Producer(real_redis, K, "w1", credit=10).send(make_batch(40, worker_id="w1"))
    c = consumer(real_redis)
    c.epoch = "e1"
    real_redis.set(K.epoch, "e1")
    got = drain(c, real_redis, ack=False, limit_s=5)
    real_redis.set(K.epoch, "e2")  # what a restart that lost the data looks like to the consumer
    with pytest.raises(EpochChanged):
        c.ack(got, trained_positions=40, stale_positions=0)
    assert read_accounting(real_redis, K)["trained_positions"] == 0 and real_redis.xlen(K.experience("w1")) == 1
    real_redis.set(K.epoch, "e1")
    c.ack(got, trained_positions=got[0].batch.num_positions, stale_positions=0)
    assert real_redis.xlen(K.experience("w1")) == 0


def test_acknowledging_works_at_maxmemory(real_redis, make_batch):
    """Acknowledging is how a full server gets memory back, so it must run past maxmemory."""
    p = Producer(real_redis, K, "w1", credit=100)
    for i in range(5):
        p.send(make_batch(40, seed=i, worker_id="w1"))
    c = consumer(real_redis, count=16)
    got = drain(c, real_redis, ack=False, limit_s=5)
    real_redis.config_set("maxmemory", int(real_redis.info("memory")["used_memory"]) - 10_000)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            real_redis.set("probe", "x")
        c.ack(got, trained_positions=sum(d.batch.num_positions for d in got), stale_positions=0)
    finally:
        real_redis.config_set("maxmemory", "512mb")
    assert real_redis.xlen(K.experience("w1")) == 0


def test_an_entry_two_learners_trained_is_counted_once(real_redis, make_batch):
    """The holder stalls past claim_idle_ms, a second learner claims and acknowledges the entry,
    then the holder acknowledges it too: counted once, the second acknowledgement is visible."""
    b = make_batch(40, seed=2, worker_id="w1")
    Producer(real_redis, K, "w1", credit=100).send(b)
    holder, other = consumer(real_redis, "L1", claim_idle_ms=200), consumer(real_redis, "L2", claim_idle_ms=200)
    got = holder.read()
    time.sleep(0.3)  # the holder stalls (a long update, a pause)
    other._next_claim = 0.0
    claimed = other.read()
    assert [d.entry_id for d in claimed] == [got[0].entry_id]
    other.ack(claimed, b.num_positions, 0)
    holder.ack(got, b.num_positions, 0)  # its update finished after all
    acc = read_accounting(real_redis, K)
    assert acc["trained_positions"] == acc["produced_positions"] == b.num_positions
    assert acc["acked_entries"] == 1 and acc["double_acks"] == 1 and balanced(acc)


def test_a_holder_that_lost_its_entries_to_a_claim_forgets_them(real_redis, make_batch):
    Producer(real_redis, K, "w1", credit=100).send(make_batch(40, seed=3, worker_id="w1"))
    holder, other = consumer(real_redis, "L1", claim_idle_ms=200), consumer(real_redis, "L2", claim_idle_ms=200)
    got = holder.read()
    time.sleep(0.3)
    other._next_claim = 0.0
    assert len(other.read()) == 1
    holder.read(block_ms=10)  # its keep-alive finds the entry owned by L2
    assert got[0].key not in holder.in_flight and holder.stats["lost_to_claims"] == 1


def test_start_up_writes_and_weights_pass_maxmemory(real_redis):
    """On a server at maxmemory (Redis 7+: allow-oom scripts; 6.2: the script opened by a write a
    full server never refuses) a process can still start (group, epoch, config, control) and the
    learner can publish: a full server must not keep the one process that frees it from running."""
    from keisei_stream.wire import atomic, status as S

    ensure_group(real_redis, K, "w1")
    real_redis.set(K.epoch, "e1")
    publish_weights(real_redis, K, 1, b"w" * 1000, "float32", keep=2, epoch="e1")
    real_redis.config_set("maxmemory", int(real_redis.info("memory")["used_memory"]) - 10_000)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            real_redis.set("probe", "x")
        ensure_group(real_redis, K, "w1")  # exists: BUSYGROUP, swallowed, not OOM
        atomic.write_small(real_redis, Keys("fresh"), ("XGROUP", "CREATE", Keys("fresh").experience("w1"), "learners",
                                                       "0", "MKSTREAM"), "a new group")
        S.set_control(real_redis, K, "stop")
        S.write_config(real_redis, K, '{"run": 1}')
        publish_weights(real_redis, K, 2, b"v" * 1000, "float32", keep=2, epoch="e1")
    finally:
        real_redis.config_set("maxmemory", "512mb")
    assert S.get_control(real_redis, K) == "stop" and S.read_config(real_redis, K) == '{"run": 1}'
    assert read_latest_weights(real_redis, K)[0] == 2
    assert real_redis.xinfo_groups(Keys("fresh").experience("w1"))[0]["name"] == b"learners"
    assert real_redis.exists(K.prefix + "oom-gate") == 0
