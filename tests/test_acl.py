"""Least-privilege ACL users on a real redis-server: what each role may do, and the denials (every
write a worker must not make, tried as that worker's user on the server the suite runs against:
``KEISEI_REDIS_SERVER`` picks Redis 6.2, 7.0, 7.2+ or Valkey)."""

from __future__ import annotations

import pytest
import redis

from keisei_stream.cli.main import main
from keisei_stream.ops import acl, compat
from keisei_stream.shogi import STARTING_SFEN, EndReason, GameRecord
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
    """role -> client logged in as that role's user (``worker`` is worker w1's, ``other`` worker
    w2's); the run has config, control, weights, a group and some accounting."""
    passwords = acl.create_users(real_redis, RUN, ["w1", "w2"])
    S.register_workers(real_redis, K, ["w1", "w2"])
    real_redis.set(K.config, "{}")
    S.set_control(real_redis, K, "run")
    W.publish_weights(real_redis, K, 1, b"weights-v1", "float32", keep=2)
    for w in ("w1", "w2"):
        C.ensure_group(real_redis, K, w)
    real_redis.hset(K.accounting, "trained_positions:w1", 5)
    real_redis.hset(K.credit, mapping={"w1": 10, "w2": 10})
    clients = {role: connect(acl.user_url(redis_server.url, acl.username(RUN, role), pw))
               for role, pw in passwords.items()}
    clients["worker"], clients["other"] = clients.pop("worker:w1"), clients.pop("worker:w2")

    yield clients
    for c in clients.values():
        c.close()
    for role in passwords:
        real_redis.execute_command("ACL", "DELUSER", acl.username(RUN, role))


def test_worker_can_do_its_job(users, make_batch, real_redis):
    w = users["worker"]
    assert w.get(K.config) == b"{}"
    assert S.get_control(w, K) == "run"
    assert W.read_latest_weights(w, K)[0] == 1
    producer = P.Producer(w, K, "w1")
    batch = make_batch(100, worker_id="w1")
    assert producer.send(batch) and producer.last_credit == 10
    assert producer.record_discarded(3) == 3
    S.write_worker_heartbeat(w, K, "w1", {"state": "playing"}, ttl_s=5)
    S.append_game(w, K, "w1", GameRecord(STARTING_SFEN, ["7g7f"], 0, EndReason.MAX_PLIES, 1), maxlen=100)
    ps = w.pubsub()
    ps.subscribe(K.weights_channel)
    ps.close()
    acc = S.read_accounting(real_redis, K)
    assert acc["produced_positions"] == batch.num_positions and acc["produced_batches"] == 1
    assert acc["worker_discarded_positions"] == 3 and acc["trained_positions"] == 5
    assert [x["id"] for x in S.read_workers(real_redis, K)] == ["w1"]


@pytest.fixture
def other_worker_state(users, make_batch):
    """Worker w2 has a heartbeat and a producer record."""
    assert P.Producer(users["other"], K, "w2").send(make_batch(60, worker_id="w2"))
    S.write_worker_heartbeat(users["other"], K, "w2", {"state": "playing"}, ttl_s=5)


@pytest.mark.parametrize("attempt", [
    lambda w: w.hset(K.weights_latest, "version", 99),
    lambda w: w.set(K.weights_blob("0" * 64), b"evil"),
    lambda w: w.xadd(K.weights_latest, {"x": 1}),
    lambda w: w.set(K.control, "stop"),
    lambda w: w.xadd(K.control, {"x": 1}),
    lambda w: w.set(K.config, "{}"),
    lambda w: w.set(K.epoch, "mine"),
    lambda w: w.hset(K.accounting, "trained_positions", 10**9),
    lambda w: w.hincrby(K.accounting, "produced_positions", 10**9),
    lambda w: w.xadd(K.accounting, {"x": 1}),
    lambda w: w.hset(K.learner, "version", 1),
    lambda w: w.xadd(K.worker("w2"), {"state": "dead"}, maxlen=1),
    lambda w: w.xadd(K.producer("w2"), {"session": "x", "seq": 10**9, "positions": 0}, maxlen=1),
    lambda w: P.Producer(w, K, "w2").record_discarded(5),
    lambda w: w.pexpire(K.worker("w1"), 1),
    lambda w: w.expire(K.config, 1),
    lambda w: w.publish(K.weights_channel, "99"),
    lambda w: w.xgroup_destroy(K.experience("w1"), K.group),
    lambda w: w.xgroup_create(K.experience("w1"), "mine", id="0"),
    lambda w: w.xreadgroup(K.group, "thief", {K.experience("w1"): ">"}, count=1),
    lambda w: w.xrange(K.experience("w2")),
    lambda w: w.xack(K.experience("w1"), K.group, "0-1"),
    lambda w: w.xdel(K.experience("w1"), "0-1"),
    lambda w: w.xtrim(K.experience("w1"), maxlen=0),
    lambda w: w.delete(K.experience("w1")),
    # another worker's stream: no add, no trim, not even through MAXLEN, no exhausting id
    lambda w: w.xadd(K.experience("w2"), {"d": "x"}),
    lambda w: w.xadd(K.experience("w2"), {"d": "x"}, maxlen=0),
    lambda w: w.xadd(K.experience("w2"), {"d": "x"}, id="18446744073709551615-18446744073709551615"),
    lambda w: w.xadd(K.worker_games("w2"), {"moves": "x"}, maxlen=0),
    lambda w: w.xadd(K.games, {"moves": "x"}, maxlen=0),  # the shared games stream is the learner's
    lambda w: w.sadd(K.roster, "w9"),
    lambda w: w.hset(K.credit, "w1", 1000),
    lambda w: w.hincrby(K.confined, "overruns:w2", 1),
    lambda w: w.set("keisei:otherrun:config", "{}"),
    # no scripting at all (issue 23: an endless script answers BUSY to everyone; a big Lua string
    # takes memory outside maxmemory)
    lambda w: w.eval("return redis.call('HSET', KEYS[1], 'version', 99)", 1, K.weights_latest),
    lambda w: w.eval("return redis.call('HINCRBY', KEYS[1], 'trained_positions', 1)", 1, K.accounting),
    lambda w: w.eval("while true do end", 0),
    lambda w: w.eval("local s = string.rep('x', 200 * 1024 * 1024) return 1", 0),
    lambda w: w.evalsha("0" * 40, 0),
    lambda w: w.script_load("return 1"),
    lambda w: w.execute_command("FCALL", "f", 0),
    lambda w: w.execute_command("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() end)"),
    lambda w: w.flushall(),
    lambda w: w.config_set("maxmemory", "1"),
    lambda w: w.execute_command("ACL", "SETUSER", "x", "on"),
], ids=["weights_latest", "weights_blob", "xadd_weights_latest", "control", "xadd_control", "config", "epoch",
        "accounting_hset", "accounting_hincrby", "xadd_accounting", "learner_hash", "other_heartbeat",
        "other_producer_record", "other_producer_discard", "pexpire_own", "expire_config", "publish",
        "xgroup_destroy", "xgroup_create", "xreadgroup", "xrange_other", "xack", "xdel", "xtrim", "del",
        "xadd_other_stream", "maxlen_other_stream", "huge_id_other_stream", "maxlen_other_games", "maxlen_games",
        "roster", "credit", "confined", "other_run", "eval_write_weights", "eval_write_accounting", "eval_loop",
        "eval_big_string", "evalsha", "script_load", "fcall", "function_load", "flushall", "config_set",
        "acl_setuser"])
def test_worker_is_denied(users, other_worker_state, real_redis, attempt):
    """Each write is refused: NOPERM, or the script's ACL failure (a command inside it); on Redis
    6.2 (no read-only key selectors) an XADD onto the run's existing strings and hashes is refused
    by their type instead. Nothing changed."""
    before = {k: real_redis.dump(k) for k in real_redis.scan_iter(match=K.prefix + "*")}
    with pytest.raises(redis.exceptions.ResponseError) as info:
        attempt(users["worker"])
    why = str(info.value)
    acl_refusal = isinstance(info.value, redis.exceptions.NoPermissionError) or \
        "can't run this command" in why or "ACL failure" in why or "unknown command" in why.lower()
    wrongtype = "WRONGTYPE" in why and not compat.server_info(real_redis).read_only_selectors
    assert acl_refusal or wrongtype, why
    after = {k: real_redis.dump(k) for k in real_redis.scan_iter(match=K.prefix + "*")}
    assert after == before


def test_monitor_reads_only(users, real_redis):
    m = users["monitor"]
    S.write_learner_status(real_redis, K, {"version": 1})
    assert S.read_learner_status(m, K)["version"] == "1"
    assert S.stream_info(m, K) is not None
    for attempt in (lambda: m.set(K.control, "stop"), lambda: m.hset(K.learner, "x", 1),
                    lambda: m.xadd(K.experience("w1"), {"x": 1})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_reader_reads_what_a_host_copy_serves_and_nothing_else(users, real_redis):
    """The ``reader`` (``keisei relay`` on the primary, the host's workers on its copy): config,
    control, epoch, the weights and their channel; no write, no other key, no stream."""
    rd = users["reader"]
    real_redis.set(K.epoch, "e1")
    assert rd.get(K.config) == b"{}" and S.get_control(rd, K) == "run" and rd.get(K.epoch) == b"e1"
    assert W.read_latest_weights(rd, K)[0] == 1
    ps = rd.pubsub()
    ps.subscribe(K.weights_channel)
    ps.close()
    before = {k: real_redis.dump(k) for k in real_redis.scan_iter(match=K.prefix + "*")}
    for attempt in (lambda: rd.set(K.control, "stop"), lambda: rd.hset(K.weights_latest, "version", 9),
                    lambda: rd.xadd(K.experience("w1"), {"x": 1}), lambda: rd.hgetall(K.accounting),
                    lambda: rd.xrange(K.experience("w1")), lambda: rd.hget(K.credit, "w1"),
                    lambda: rd.smembers(K.roster), lambda: rd.publish(K.weights_channel, "9"),
                    lambda: rd.get("keisei:otherrun:config"), lambda: rd.eval("return 1", 0)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    other = rd.pubsub()
    other.subscribe("keisei:otherrun:weights")  # the refusal comes with the reply
    with pytest.raises(redis.exceptions.NoPermissionError):
        other.get_message(timeout=2)
    assert {k: real_redis.dump(k) for k in real_redis.scan_iter(match=K.prefix + "*")} == before


def test_learner_works_the_group_but_cannot_administer(users, make_batch, real_redis):
    lr = users["learner"]
    P.Producer(real_redis, K, "w1").send(make_batch(100, worker_id="w1"))
    consumer = C.Consumer(lr, K, "learner-0", max_plies=64, block_ms=10, count=4, claim_idle_ms=60_000,
                          deadletter_maxlen=100)
    assert consumer.workers == ["w1", "w2"] and consumer.credit == {"w1": 32, "w2": 32}
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
    assert main(["users", "--redis", redis_server.url, "--run", "cliusers", "--workers", "2"]) == 0
    lines = dict(line.split()[0:3:2] for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {*acl.ROLES, "worker:w0", "worker:w1"}
    assert S.read_roster(real_redis, Keys("cliusers")) == ["w0", "w1"]  # the learner reads their streams
    w = connect(lines["worker:w0"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.set("keisei:cliusers:control", "stop")
    assert w.get("keisei:cliusers:config") is None  # reading is allowed
    S.write_worker_heartbeat(w, Keys("cliusers"), "w0", {"state": "playing"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        S.write_worker_heartbeat(w, Keys("cliusers"), "w1", {"state": "playing"})
    w.close()
    assert main(["users", "--rules", "--redis", "unused", "--run", "cliusers", "--worker-id", "a"]) == 0
    out = capsys.readouterr().out
    assert out.count("ACL SETUSER keisei-cliusers-") == len(acl.ROLES) + 1 and "%R~" in out
    worker_line = next(line for line in out.splitlines() if "keisei-cliusers-worker-a" in line)
    assert "SADD keisei:cliusers:roster a" in out and "+eval" not in worker_line and "script" not in worker_line
    assert main(["users", "--rules", "--redis", "unused", "--run", "cliusers", "--server-version", "6.2"]) == 0
    assert "%R~" not in capsys.readouterr().out
    for role in lines:
        real_redis.execute_command("ACL", "DELUSER", acl.username("cliusers", role))


def test_keisei_users_gives_every_node_the_same_users(real_redis, redis_server, tmp_path, capsys):
    """ACL users are not replicated: ``--redis`` repeated creates them on each node with the same
    passwords; ``--role`` with ``--password`` creates one user (the reader on a host's replica)."""
    from keisei_stream.ops.embedded_redis import start_redis

    with start_redis(tmp_path / "second") as second:
        assert main(["users", "--redis", redis_server.url, "--redis", second.url, "--run", "twice", "--workers", "1",
                     "--url", "redis+sentinel://s1:26379,s2/keisei/0"]) == 0
        lines = dict(line.split()[0:3:2] for line in capsys.readouterr().out.splitlines())
        assert lines["learner"].startswith("redis+sentinel://keisei-twice-learner:") and "@s1:26379,s2/keisei/0" in lines["learner"]
        password = lines["worker:w0"].split("@")[0].rsplit(":", 1)[1]
        for url in (redis_server.url, second.url):
            assert connect(acl.user_url(url, "keisei-twice-worker-w0", password)).get("keisei:twice:config") is None
        assert main(["users", "--redis", second.url, "--run", "twice", "--role", "reader", "--password", "pw"]) == 0
        assert connect(acl.user_url(second.url, "keisei-twice-reader", "pw")).get("keisei:twice:control") is None
        assert main(["users", "--redis", second.url, "--run", "twice", "--role", "reader"]) == 2
    for role in lines:
        real_redis.execute_command("ACL", "DELUSER", acl.username("twice", role))


def test_workers_reading_through_host_copies_get_no_weights_config_or_control_on_the_primary(
        real_redis, redis_server, capsys, make_batch):
    """``keisei users --host-copies``: the workers read config, control and weights on their host's
    copy (``keisei relay``, as the reader), so their users on the primary read only the epoch and
    the credit besides their own keys: a worker's credential cannot pull weights blobs over the
    primary's link. Adding experience works as before."""
    run, keys = "hcopies", Keys("hcopies")
    assert main(["users", "--redis", redis_server.url, "--run", run, "--workers", "1", "--host-copies"]) == 0
    lines = dict(line.split()[0:3:2] for line in capsys.readouterr().out.splitlines())
    real_redis.set(keys.epoch, "e1")
    W.publish_weights(real_redis, keys, 1, b"weights-v1", "float32", keep=2)
    w = connect(lines["worker:w0"])
    assert w.get(keys.epoch) == b"e1" and w.hget(keys.credit, "w0") is None
    assert P.Producer(w, keys, "w0").send(make_batch(50, worker_id="w0"))
    for attempt in (lambda: w.get(keys.config), lambda: w.get(keys.control), lambda: W.read_latest_weights(w, keys),
                    lambda: w.get(keys.weights_blob("0" * 64))):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    ps = w.pubsub()
    ps.subscribe(keys.weights_channel)
    with pytest.raises(redis.exceptions.NoPermissionError):
        ps.get_message(timeout=2)
    w.close()
    assert main(["users", "--rules", "--redis", "unused", "--run", run, "--worker-id", "a", "--host-copies"]) == 0
    worker_line = next(line for line in capsys.readouterr().out.splitlines() if "keisei-hcopies-worker-a" in line)
    assert "weights" not in worker_line and ":config" not in worker_line and ":epoch" in worker_line
    for role in lines:
        real_redis.execute_command("ACL", "DELUSER", acl.username(run, role))


@pytest.mark.parametrize("version", ["6.2.14", "7.0.15", "7.2.4"])
def test_rules_name_only_what_the_server_knows(version):
    """No rule newer than the server: ``+quit`` from 7.0, ``+client|setinfo`` from 7.2, ``%R~`` from 7.0."""
    server = compat.ServerInfo(compat.parse_version(version))
    rules = [r for role in (*acl.ROLES, acl.worker_role("w0")) for r in acl.role_rules(K, role, server)]
    assert ("+quit" in rules) == (server.version >= (7, 0, 0))
    assert ("+client|setinfo" in rules) == (server.version >= (7, 2, 0))
    assert any(r.startswith("%R~") for r in rules) == (server.version >= (7, 0, 0))


def test_the_rules_of_the_running_server_are_accepted(real_redis):
    """The server the suite runs against takes every role's rules (the Debian 12 Redis 7.0 refused
    ``+client|setinfo``, which ``keisei run`` sent before)."""
    server = compat.require_supported(real_redis)
    try:
        for role in (*acl.ROLES, acl.worker_role("w0")):
            rules = acl.role_rules(K, role, server)
            reply = real_redis.execute_command("ACL", "SETUSER", "probe", "reset", "on", ">pw", *rules)
            assert reply in (True, b"OK", "OK"), (role, reply)
            # the server holds the role's key and channel patterns as given, none dropped (commands it
            # rewrites into its own form, so only the patterns can be compared as text)
            listed = next(line for line in (x.decode() if isinstance(x, bytes) else x
                                            for x in real_redis.execute_command("ACL", "LIST"))
                          if line.startswith("user probe "))
            for rule in rules:
                if rule[0] in "~%&":
                    assert rule in listed.split(), (role, rule, listed)
    finally:
        real_redis.execute_command("ACL", "DELUSER", "probe")


def test_version_check_names_the_minimum():
    class Old:
        def info(self, section):
            return {"redis_version": "6.0.16"}

    with pytest.raises(compat.UnsupportedServer, match="6.2.0 or newer"):
        compat.require_supported(Old())
    assert compat.parse_version("7.2.4-rc1") == (7, 2, 4)
    valkey = compat.server_info(type("V", (), {"info": lambda self, s: {"redis_version": "7.2.4", "server_name": "valkey",
                                                                          "valkey_version": "9.1.2"}})())
    assert valkey.name == "valkey" and valkey.describe() == "Valkey 9.1.2 (Redis 7.2.4 compatible)"


def test_worker_ids_that_cannot_be_users_are_refused():
    for bad in ("", "a b", "a:b", "a@b", "x" * 65):
        with pytest.raises(ValueError):
            acl.worker_role(bad)
