"""``keisei relay``: a host's read-only copy of the run on real servers (the suite's server as the
primary, a private one on a unix socket as the host's copy), and a real worker reading through it."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time

import pytest
import redis

from keisei_stream.ops import acl, relay
from keisei_stream.wire import status as S
from keisei_stream.wire import weights as W
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys

HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from procs import ROOT, assert_accounting_balances, start_learner, start_worker, wait_for, weights_version  # noqa: E402

pytestmark = pytest.mark.redis


def _step_until(rl: relay.Relay, pred, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, "the relay did not copy in time"
        rl.step(wait_s=0.1)


def test_the_relay_copies_versions_forward_control_and_config(real_redis, redis_server, tmp_path):
    run = "relayrun"
    keys = Keys(run)
    pw = acl.create_users(real_redis, run)["reader"]
    real_redis.set(keys.config, '{"x": 1}')
    real_redis.set(keys.epoch, "e1")
    S.set_control(real_redis, keys, "run")
    W.publish_weights(real_redis, keys, 1, b"v1-bytes", "bfloat16", keep=4)
    reader_url = acl.user_url(redis_server.url, acl.username(run, "reader"), pw)
    rl, server, read_url = relay.start_host_copy(reader_url, run, tmp_path / "host.sock", tmp_path)
    try:
        host = connect(read_url)  # the host's workers' view: the reader user on the host's copy
        _step_until(rl, lambda: W.read_latest_weights(host, keys) is not None)
        assert W.read_latest_weights(host, keys)[0] == 1 and host.get(keys.config) == b'{"x": 1}'
        assert host.get(keys.epoch) == b"e1" and S.get_control(host, keys) == "run"
        watcher = W.WeightsWatcher(host, keys, poll_s=60)
        watcher.wait(1.0)  # the subscription's confirmation
        watcher.known = 1
        sha2 = W.publish_weights(real_redis, keys, 2, b"v2-bytes", "bfloat16", keep=4)
        rl.step(wait_s=2.0)  # woken by the primary's announcement
        assert watcher.wait(2.0) == 2  # the host's announcement
        assert W.read_latest_weights(host, keys) == (2, sha2, b"v2-bytes")
        with pytest.raises(Exception):  # the reader cannot write the host's copy
            host.set(keys.control, "stop")
        S.set_control(real_redis, keys, "pause")
        _step_until(rl, lambda: S.get_control(host, keys) == "pause", S.CONTROL_S + 5)
        # a blob that does not match weights:latest is refused; the host keeps version 2
        real_redis.hset(keys.weights_latest, mapping={"version": 3, "sha256": hashlib.sha256(b"x").hexdigest(),
                                                      "bytes": 1})
        real_redis.set(keys.weights_blob(hashlib.sha256(b"x").hexdigest()), b"y")
        real_redis.publish(keys.weights_channel, "3")
        _step_until(rl, lambda: rl.refused >= 1)
        assert W.read_latest_weights(host, keys)[0] == 2
        # versions only go forwards, until the run's epoch changes (a new run)
        W.publish_weights(real_redis, keys, 1, b"v1-again", "bfloat16", keep=4)
        for _ in range(5):
            rl.step(wait_s=0.1)
        assert W.read_latest_weights(host, keys)[0] == 2
        real_redis.set(keys.epoch, "e2")
        rl._next_sync = 0.0
        W.publish_weights(real_redis, keys, 1, b"v1-new-run", "bfloat16", keep=4)
        _step_until(rl, lambda: W.read_latest_weights(host, keys)[2] == b"v1-new-run")
        assert rl.copied == 3
    finally:
        rl.watcher.close()
        server.stop()
    real_redis.execute_command("ACL", "DELUSER", *(acl.username(run, role) for role in acl.ROLES))


def test_gpu_sized_weights_pass_the_request_limits_of_the_primary_and_of_a_host_copy(tmp_path):
    """Issue 23's request-size limits admit the gpu net's weights (6,338,742 bytes in bfloat16):
    the learner publishes them to a primary started with the run's limits
    (:func:`keisei_stream.ops.local.request_limit` of configs/gpu.yaml), a relay copies them to its
    host's server, which starts at the 1 MiB minimum (its readers send only small requests) and is
    raised to fit the blob; a request above the limit is still refused."""
    from keisei_stream.config import load_config
    from keisei_stream.ops import embedded_redis, local
    from keisei_stream.rl.checkpoint import weights_bytes_bound

    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    limit = local.request_limit(cfg)
    assert weights_bytes_bound(cfg.model, "bfloat16") >= 6_338_742 and limit == 13 << 20
    run, keys = "gpublob", Keys("gpublob")
    primary = embedded_redis.start_redis(tmp_path / "primary", max_request_bytes=limit)
    try:
        admin = connect(primary.url)
        pw = acl.create_users(admin, run)["learner"]
        learner = connect(acl.user_url(primary.url, acl.username(run, "learner"), pw))
        blob = bytes(range(256)) * (6_338_742 // 256) + b"x" * (6_338_742 % 256)
        sha = W.publish_weights(learner, keys, 1, blob, "bfloat16", keep=2)
        reader_pw = acl.create_users(admin, run)["reader"]  # (new passwords; the learner's connection stays)
        reader_url = acl.user_url(primary.url, acl.username(run, "reader"), reader_pw)
        rl, server, read_url = relay.start_host_copy(reader_url, run, tmp_path / "host.sock", tmp_path / "host")
        try:
            host_admin = connect(server.url)
            assert int(host_admin.config_get("proto-max-bulk-len")["proto-max-bulk-len"]) == 1 << 20
            rl.copy_weights()
            assert W.read_latest_weights(connect(read_url), keys) == (1, sha, blob)
            assert int(host_admin.config_get("proto-max-bulk-len")["proto-max-bulk-len"]) == 13 << 20
            assert int(host_admin.config_get("client-query-buffer-limit")["client-query-buffer-limit"]) == 26 << 20
        finally:
            rl.watcher.close()
            server.stop()
        with pytest.raises((redis.ConnectionError, redis.ResponseError)):  # above the limit: refused
            connect(primary.url, retry=None).set(keys.prefix + "big", b"\0" * (limit + 1))
    finally:
        primary.stop()


@pytest.mark.slow
def test_a_worker_reads_weights_and_control_through_keisei_relay(real_redis, redis_server, tmp_path):
    """End to end: a learner on the primary, ``keisei relay`` for the worker's host, a worker that
    reads there (``--read-redis``) and writes to the primary; versions reach the worker, a stop set
    on the primary reaches it through the relay, and the accounting balances."""
    run = "relayed"
    keys = Keys(run)
    passwords = acl.create_on_nodes([real_redis], run, ["w0"], host_copies=True)  # as keisei users --host-copies
    url = {role: acl.user_url(redis_server.url, acl.username(run, role), pw) for role, pw in passwords.items()}
    S.set_control(real_redis, keys, "run")
    learner = start_learner(url["learner"], run, tmp_path)
    rl = subprocess.Popen([sys.executable, "-m", "keisei_stream.cli", "relay", "--redis", url["reader"], "--run", run,
                           "--socket", str(tmp_path / "host.sock")], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=open(tmp_path / "relay.log", "wb"), text=True)
    procs = [learner, rl]
    try:
        line = rl.stdout.readline()
        read_url = re.search(r"--read-redis (\S+)", line).group(1)
        worker = start_worker(url["worker:w0"], run, tmp_path, "w0", "--read-redis", read_url)
        procs.append(worker)

        def worker_version() -> int:
            beats = S.read_workers(real_redis, keys)
            return int(beats[0]["version"]) if beats else 0

        wait_for(lambda: weights_version(real_redis, keys) >= 4 and worker_version() >= 3, 180,
                 "versions through the relay", procs)
        S.set_control(real_redis, keys, "stop")
        assert worker.wait(60) == 0  # the stop reached it through the relay
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(90) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    assert rl.returncode == 0 or rl.returncode == -signal.SIGTERM
    assert "copied to this host" in (tmp_path / "relay.log").read_text()
    assert_accounting_balances(real_redis, keys)
    real_redis.execute_command("ACL", "DELUSER", *(acl.username(run, role) for role in passwords))
