"""Least-privilege ACL users on a real redis-server: what each role may do, and the denials."""

from __future__ import annotations

import pytest
import redis

from keisei_stream.cli.main import main
from keisei_stream.ops import acl
from keisei_stream.wire import consumer as C
from keisei_stream.wire import producer as P
from keisei_stream.wire import status as S
from keisei_stream.wire import weights as W
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys

pytestmark = pytest.mark.redis

RUN = "aclrun"
K = Keys(RUN)


@pytest.fixture
def users(real_redis, redis_server):
    """role -> client logged in as that role's user; the run has config, weights and a group."""
    passwords = acl.create_users(real_redis, RUN)
    real_redis.set(K.config, "{}")
    S.set_control(real_redis, K, "run")
    W.publish_weights(real_redis, K, 1, b"weights-v1", "float32", keep=2)
    C.ensure_group(real_redis, K)
    clients = {role: connect(acl.user_url(redis_server.url, acl.username(RUN, role), pw))
               for role, pw in passwords.items()}
    yield clients
    for c in clients.values():
        c.close()
    for role in acl.ROLES:
        real_redis.execute_command("ACL", "DELUSER", acl.username(RUN, role))


def test_worker_can_do_its_job(users, make_batch):
    w = users["worker"]
    assert w.get(K.config) == b"{}"
    assert S.get_control(w, K) == "run"
    assert W.read_latest_weights(w, K)[0] == 1
    assert P.Producer(w, K, "w1", max_backlog=10).send(make_batch(100, worker_id="w1"))
    S.write_worker_heartbeat(w, K, "w1", {"state": "playing"}, ttl_s=5)
    S.append_game(w, K, {"moves": "7g7f"}, maxlen=100)
    w.hincrby(K.accounting, "worker_discarded_positions", 3)
    ps = w.pubsub()
    ps.subscribe(K.weights_channel)
    ps.close()


@pytest.mark.parametrize("attempt", [
    lambda w: w.hset(K.weights_latest, "version", 99),
    lambda w: w.set(K.weights_blob("0" * 64), b"evil"),
    lambda w: w.set(K.control, "stop"),
    lambda w: w.set(K.config, "{}"),
    lambda w: w.hset(K.learner, "version", 1),
    lambda w: w.publish(K.weights_channel, "99"),
    lambda w: w.xgroup_destroy(K.experience, K.group),
    lambda w: w.xgroup_create(K.experience, "mine", id="0"),
    lambda w: w.xreadgroup(K.group, "thief", {K.experience: ">"}, count=1),
    lambda w: w.xack(K.experience, K.group, "0-1"),
    lambda w: w.xdel(K.experience, "0-1"),
    lambda w: w.xtrim(K.experience, maxlen=0),
    lambda w: w.delete(K.experience),
    lambda w: w.set("keisei:otherrun:config", "{}"),
    lambda w: w.eval("return redis.call('HSET', KEYS[1], 'version', 99)", 1, K.weights_latest),
    lambda w: w.flushall(),
    lambda w: w.config_set("maxmemory", "1"),
    lambda w: w.execute_command("ACL", "SETUSER", "x", "on"),
], ids=["weights_latest", "weights_blob", "control", "config", "learner_hash", "publish", "xgroup_destroy",
        "xgroup_create", "xreadgroup", "xack", "xdel", "xtrim", "del", "other_run", "eval_write_weights",
        "flushall", "config_set", "acl_setuser"])
def test_worker_is_denied(users, attempt):
    with pytest.raises(redis.exceptions.NoPermissionError):
        attempt(users["worker"])


def test_monitor_reads_only(users, real_redis):
    m = users["monitor"]
    S.write_learner_status(real_redis, K, {"version": 1})
    assert S.read_learner_status(m, K)["version"] == "1"
    assert S.stream_info(m, K) is not None
    for attempt in (lambda: m.set(K.control, "stop"), lambda: m.hset(K.learner, "x", 1),
                    lambda: m.xadd(K.experience, {"x": 1})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_learner_works_the_group_but_cannot_administer(users, make_batch, real_redis):
    lr = users["learner"]
    P.Producer(real_redis, K, "w1", max_backlog=10).send(make_batch(100, worker_id="w1"))
    consumer = C.Consumer(lr, K, "learner-0", max_plies=64, block_ms=10, count=4, claim_idle_ms=60_000,
                          deadletter_maxlen=100)
    got = consumer.read()
    assert len(got) == 1
    consumer.ack(got, trained_positions=got[0].batch.num_positions, stale_positions=0)
    W.publish_weights(lr, K, 2, b"weights-v2", "float32", keep=2)
    S.set_control(lr, K, "pause")
    for attempt in (lambda: lr.flushall(), lambda: lr.config_set("maxmemory", "1"), lambda: lr.keys("*"),
                    lambda: lr.set("keisei:otherrun:config", "{}")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_user_url():
    assert acl.user_url("redis://h:6379/0", "u", "p") == "redis://u:p@h:6379/0"
    assert acl.user_url("redis://:old@h:6379/0", "u", "p") == "redis://u:p@h:6379/0"
    assert acl.user_url("unix:///tmp/r.sock", "u", "p") == "unix://u:p@/tmp/r.sock"
    assert acl.user_url("rediss://h:6380", "u", "p") == "rediss://u:p@h:6380"


def test_keisei_users_creates_working_users(real_redis, redis_server, capsys):
    assert main(["users", "--redis", redis_server.url, "--run", "cliusers"]) == 0
    lines = dict(line.split()[0:3:2] for line in capsys.readouterr().out.splitlines())
    assert set(lines) == set(acl.ROLES)
    w = connect(lines["worker"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.set("keisei:cliusers:control", "stop")
    assert w.get("keisei:cliusers:config") is None  # reading is allowed
    w.close()
    assert main(["users", "--rules", "--redis", "unused", "--run", "cliusers"]) == 0
    assert capsys.readouterr().out.count("ACL SETUSER keisei-cliusers-") == len(acl.ROLES)
    for role in acl.ROLES:
        real_redis.execute_command("ACL", "DELUSER", acl.username("cliusers", role))
