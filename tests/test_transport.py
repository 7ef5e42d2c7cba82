"""Transport unit tests on fakeredis (credit, exactly-once adds, dedup, deadletter, weights, status)."""

from __future__ import annotations

import time

import pytest

from keisei_stream.shogi import STARTING_SFEN, EndReason, GameRecord
from keisei_stream.wire.codec import encode_batch
from keisei_stream.wire.consumer import Consumer, DEADLETTER_FIELD_BYTES
from keisei_stream.wire.keys import ACCOUNTING_FIELDS, Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import (
    append_game, append_metrics, get_control, read_accounting, read_config, read_learner_status,
    read_stream, read_worker_accounting, read_workers, register_workers, set_control, stream_info, write_config,
    write_learner_status, write_worker_heartbeat,
)
from keisei_stream.wire.weights import (
    WeightsError, WeightsWatcher, publish_weights, read_latest_info, read_latest_weights,
)

K = Keys("unit")


def consumer(r, name="L1", workers=("w1",), **kw):
    """A consumer of the run's workers (put on the roster first)."""
    register_workers(r, K, list(workers))
    opts = dict(max_plies=64, block_ms=10, count=8, claim_idle_ms=100, deadletter_maxlen=10_000, window=64)
    opts.update(kw)
    return Consumer(r, K, name, **opts)


def balanced(acc):
    return acc["produced_positions"] == (acc["trained_positions"] + acc["stale_positions"]
                                         + acc["rejected_positions"] + acc["duplicate_positions"])


def test_keys_layout():
    assert K.experience("w-1") == "keisei:unit:experience:w-1" and K.experience_pattern == "keisei:unit:experience:*"
    assert K.worker_games("w-1") == "keisei:unit:games:w-1"
    assert K.weights_blob("ab") == "keisei:unit:weights:blob:ab"
    assert K.worker("w-1") == "keisei:unit:workers:w-1" and K.workers_pattern == "keisei:unit:workers:*"
    assert K.accounting == "keisei:unit:accounting" and K.group == "learners"
    assert K.producer("w-1") == "keisei:unit:producers:w-1" and K.producers_pattern == "keisei:unit:producers:*"
    # every key of the run, spelled out (the names are a contract with redis-cli users and other processes)
    names = {"deadletter": "deadletter", "metrics": "metrics", "games": "games",
             "eval": "eval", "config": "config", "control": "control", "learner": "learner",
             "accounting": "accounting", "supervisor": "supervisor", "weights_latest": "weights:latest",
             "weights_index": "weights:index", "weights_channel": "weights", "losses": "losses", "epoch": "epoch",
             "roster": "roster", "credit": "credit", "confined": "confined"}
    assert {attr: getattr(K, attr) for attr in names} == {a: "keisei:unit:" + n for a, n in names.items()}
    assert Keys("unit") == K and hash(Keys("unit")) == hash(K)
    with pytest.raises(ValueError):
        Keys("bad run id")
    with pytest.raises(ValueError):
        K.worker("a*b")
    with pytest.raises(ValueError):
        K.experience("a b")


def test_producer_waits_for_credit_and_can_stop(fake_redis, make_batch):
    c = consumer(fake_redis, window=2)  # one worker on the roster: credit 2
    assert fake_redis.hget(K.credit, "w1") == b"2"
    p = Producer(fake_redis, K, "w1", backoff_max_s=0.05)
    b = make_batch(50, worker_id="w1")
    assert p.send(b) and p.send(b)
    waits = []
    t0 = time.monotonic()
    assert p.send(b, should_stop=lambda: time.monotonic() - t0 > 0.2, on_wait=waits.append) is False
    assert fake_redis.xlen(K.experience("w1")) == 2 and p.last_credit == 2
    assert p.waited_s > 0 and waits and p.full_waits > 0
    acc = read_accounting(fake_redis, K)
    assert acc["produced_batches"] == 2 and acc["produced_positions"] == 2 * b.num_positions
    # room again: the kept batch goes in with the same sequence number
    got = c.read()
    c.ack(got, sum(d.batch.num_positions for d in got), 0)
    assert p.send(b)
    assert [d.batch.batch_id for d in c.read()] == [f"w1:{p.session}:2"]


def test_a_retried_add_is_recognised_by_the_record(fake_redis, make_batch):
    """The reply of an add lost with the connection: the next attempt reads the record, which
    names this session and sequence number, and does not add the batch again."""
    p = Producer(fake_redis, K, "w1", credit=10)
    b = make_batch(50, worker_id="w1")
    fields = encode_batch(b)
    assert p._try_add(fields, b.num_positions) == "added"
    assert p._try_add(fields, b.num_positions) == "added"  # the retry after a lost reply
    assert fake_redis.xlen(K.experience("w1")) == 1
    assert read_accounting(fake_redis, K)["produced_batches"] == 1
    # a new producer session (restarted worker, same id) starts at seq 0 and is not a duplicate
    p2 = Producer(fake_redis, K, "w1", credit=10)
    assert p2.send(b) and fake_redis.xlen(K.experience("w1")) == 2
    assert read_accounting(fake_redis, K)["produced_batches"] == 2
    assert p2.record_discarded(7) == 7 and p2.record_discarded(3) == 10
    assert read_accounting(fake_redis, K)["worker_discarded_positions"] == 10


def test_consumer_dedups_and_accounts_per_worker(fake_redis, make_batch):
    b = make_batch(60, worker_id="w9", batch_id="w9:s:0")
    fields = encode_batch(b)
    fake_redis.xadd(K.experience("w9"), fields)
    fake_redis.xadd(K.experience("w9"), fields)  # a client-side retry written twice
    c = consumer(fake_redis, workers=("w9",))
    got = c.read()
    assert len(got) == 1 and got[0].batch.batch_id == "w9:s:0" and got[0].worker == "w9"
    c.ack(got, trained_positions=40, stale_positions=b.num_positions - 40)
    acc = read_accounting(fake_redis, K)
    assert acc["duplicate_positions"] == b.num_positions and acc["duplicate_entries"] == 1
    assert acc["trained_positions"] == 40 and acc["stale_positions"] == b.num_positions - 40
    assert fake_redis.xlen(K.experience("w9")) == 0
    assert set(ACCOUNTING_FIELDS) <= set(acc)
    per = read_worker_accounting(fake_redis, K)["w9"]
    assert per["trained_positions"] == 40 and per["duplicate_entries"] == 1


def test_bad_entries_go_to_deadletter(fake_redis, make_batch):
    fake_redis.xadd(K.experience("w1"), {"d": b"\x00" * 100_000, "w": "w1", "v": 1, "n": 7, "s": 1})
    fake_redis.xadd(K.experience("w1"), {"x": "y"})
    good = make_batch(50, worker_id="w1")
    fake_redis.xadd(K.experience("w1"), encode_batch(good))
    named_other = make_batch(50, worker_id="w2", batch_id="w2:s:0")
    fake_redis.xadd(K.experience("w1"), encode_batch(named_other))  # w2's entry on w1's stream
    c = consumer(fake_redis)
    got = c.read()
    assert [d.batch.num_positions for d in got] == [good.num_positions]
    dead = fake_redis.xrange(K.deadletter)
    assert len(dead) == 3
    first = dead[0][1]
    assert first[b"worker"] == b"w1" and first[b"stream_worker"] == b"w1" and b"reason" in first
    assert len(first[b"raw:d"]) == DEADLETTER_FIELD_BYTES and int(first[b"raw_bytes"]) > 100_000
    assert dead[2][1][b"reason"].startswith(b"field w:")
    acc = read_accounting(fake_redis, K)
    # counted by what was decoded (nothing: the fields are checked first), never by the claim n=7
    assert acc["rejected_entries"] == 3 and acc["rejected_positions"] == 0
    assert first[b"claimed_positions"] == b"7" and first[b"decoded_positions"] == b"0"
    assert fake_redis.xlen(K.experience("w1")) == 1  # only the good, unacknowledged one
    assert stream_info(fake_redis, K)["deadletter"] == 3


def test_restarted_consumer_rereads_own_pending(fake_redis, make_batch):
    register_workers(fake_redis, K, ["w1", "w2"])
    for w in ("w1", "w2"):
        p = Producer(fake_redis, K, w, credit=10)
        for i in range(3):
            p.send(make_batch(40, seed=i, worker_id=w))
    first = consumer(fake_redis, "L1", workers=("w1", "w2")).read()
    assert len(first) == 6 and {d.worker for d in first} == {"w1", "w2"}
    again = consumer(fake_redis, "L1", workers=("w1", "w2")).read()  # same name after a crash: own pending first
    assert sorted(d.key for d in again) == sorted(d.key for d in first)


def test_recover_puts_every_known_worker_back_on_the_roster(fake_redis, make_batch):
    """A server restarted empty: a roster refresh between the reconnection and the loss's
    detection reads an empty roster; the recovery must still put the workers back, or their
    entries are never read again (seen in CI: the run stopped training after the restart)."""
    c = consumer(fake_redis, "L1", workers=("w1", "w2"))
    c.claim_epoch()
    fake_redis.flushall()  # the restart without the run's data
    c.refresh(force=True)
    assert c.workers == []
    c.epoch_refused()
    assert c.check_server()  # the epoch key is gone
    c.recover({})
    assert sorted(fake_redis.smembers(K.roster)) == [b"w1", b"w2"] and c.workers == ["w1", "w2"]
    Producer(fake_redis, K, "w2", credit=10).send(make_batch(40, seed=1, worker_id="w2"))
    assert [d.worker for d in c.read()] == ["w2"]


def test_weights_publish_read_prune(fake_redis):
    for v in range(1, 6):
        sha = publish_weights(fake_redis, K, v, b"w%d" % v * 100, "float32", keep=2)
    version, got_sha, data = read_latest_weights(fake_redis, K)
    assert version == 5 and got_sha == sha and data == b"w5" * 100
    blobs = list(fake_redis.scan_iter(match=K.prefix + "weights:blob:*"))
    assert len(blobs) == 2
    info = read_latest_info(fake_redis, K)
    assert info["dtype"] == "float32" and info["bytes"] == 200
    fake_redis.set(K.weights_blob(sha), b"tampered")
    with pytest.raises(WeightsError):
        read_latest_weights(fake_redis, K)


def test_no_weights_yet(fake_redis):
    assert read_latest_weights(fake_redis, K) is None
    w = WeightsWatcher(fake_redis, K, poll_s=0.01)
    assert w.poll() is None
    w.close()


def test_watcher_polls_when_pubsub_is_lost(fake_redis):
    w = WeightsWatcher(fake_redis, K, poll_s=0.05)
    assert w.poll() is None
    w.close()  # as if the pub/sub connection dropped: messages are lost
    w._pubsub = None
    publish_weights(fake_redis, K, 3, b"abc", "float32", keep=2)
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        got = w.poll()
        time.sleep(0.01)
    assert got == 3
    assert w.poll() is None  # reported once
    w.close()


def test_heartbeats_control_metrics(fake_redis):
    write_worker_heartbeat(fake_redis, K, "w1", {"positions": 10, "rate": 1.5, "version": 2}, ttl_s=30)
    write_worker_heartbeat(fake_redis, K, "w2", {"positions": 5}, ttl_s=30)
    ws = read_workers(fake_redis, K)
    assert [w["id"] for w in ws] == ["w1", "w2"] and ws[0]["positions"] == "10"
    write_worker_heartbeat(fake_redis, K, "w1", {"positions": 11}, ttl_s=30)
    assert fake_redis.xlen(K.worker("w1")) == 1  # the newest heartbeat only
    ws = read_workers(fake_redis, K)
    assert ws[0]["positions"] == "11" and ws[0]["alive"] == "1"
    write_worker_heartbeat(fake_redis, K, "w2", {"positions": 5, "last_seen": time.time() - 60}, ttl_s=30)
    assert [w["alive"] for w in read_workers(fake_redis, K)] == ["1", "0"]
    assert [w["id"] for w in read_workers(fake_redis, K, max_age_s=30)] == ["w1"]
    assert get_control(fake_redis, K) == "run"
    set_control(fake_redis, K, "pause")
    assert get_control(fake_redis, K) == "pause"
    with pytest.raises(ValueError):
        set_control(fake_redis, K, "explode")
    for i in range(50):
        append_metrics(fake_redis, K, {"update": i, "loss": 0.5}, maxlen=10)
    assert fake_redis.xlen(K.metrics) <= 50
    assert read_stream(fake_redis, K.metrics, 3)[-1][1]["update"] == "49"
    game = GameRecord(STARTING_SFEN, ["7g7f", "3c3d"], 0, EndReason.MAX_PLIES, 2)
    append_game(fake_redis, K, "w1", game, maxlen=10, version=3)
    entry = read_stream(fake_redis, K.worker_games("w1"), 1)[-1][1]
    assert entry["moves"] == "7g7f 3c3d" and entry["reason"] == "MAX_PLIES" and entry["version"] == "3"
    write_learner_status(fake_redis, K, {"version": 3, "loss": 0.1})
    assert read_learner_status(fake_redis, K)["version"] == "3"
    write_config(fake_redis, K, '{"a": 1}')
    assert read_config(fake_redis, K) == '{"a": 1}'


def test_stream_info_without_group(fake_redis):
    info = stream_info(fake_redis, K)
    assert info["length"] == 0 and info["pending"] == 0 and info["deadletter"] == 0 and info["streams"] == 0
    register_workers(fake_redis, K, ["w1"])
    info = stream_info(fake_redis, K)
    assert info["streams"] == 1 and info["workers"] == {"w1": {"length": 0, "pending": 0}}


def test_a_stopping_producer_still_tries_once(fake_redis, make_batch):
    """A worker's last send at stop (should_stop already True) adds the batch when there is room,
    and gives up at once when there is none (the worker then counts the positions as discarded)."""
    p = Producer(fake_redis, K, "w1")  # no credit published: 1
    assert p.send(make_batch(30, seed=1), should_stop=lambda: True)
    assert not p.send(make_batch(30, seed=2), should_stop=lambda: True)
    assert fake_redis.xlen(K.experience("w1")) == 1 and p.full_waits == 1
