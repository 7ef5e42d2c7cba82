"""End-to-end: the real learner and worker processes against a real redis-server (tiny config).

Each test uses its own run id on the session's server, so tests never see each other's keys.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keisei_stream.wire import status
from keisei_stream.config import load_config
from keisei_stream.wire.embedded_redis import connect
from keisei_stream.wire.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _learner(url, run, run_dir, *extra):
    cmd = [sys.executable, "-m", "learner", "--config", str(TINY), "--redis", url, "--run", run,
           "--set", f"run.dir={run_dir}", "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(run_dir / f"learner-{run}-{time.time():.0f}.log", "ab"),
                            stderr=subprocess.STDOUT)


def _worker(url, run, run_dir, wid, *extra):
    cmd = [sys.executable, "-m", "workers", "--redis", url, "--run", run, "--id", wid, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(run_dir / f"worker-{run}-{wid}.log", "ab"),
                            stderr=subprocess.STDOUT)


def _wait(pred, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        for p in procs:
            assert p.poll() is None, f"process {p.args[:3]} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _version(r, keys) -> int:
    v = r.hget(keys.weights_latest, "version")
    return int(v) if v is not None else 0


def _stop_all(r, keys, workers, learner):
    status.set_control(r, keys, "stop")
    for w in workers:
        assert w.wait(30) == 0, "worker did not stop cleanly on control=stop"
    if learner is not None:
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(90) == 0, "learner did not stop cleanly on SIGTERM"


def _assert_accounting_balances(r, keys):
    acc = status.read_accounting(r, keys)
    produced = acc.get("produced_positions", 0)
    settled = sum(acc.get(k, 0) for k in ("trained_positions", "stale_positions", "rejected_positions",
                                          "duplicate_positions"))
    assert produced > 0
    assert r.xlen(keys.experience) == 0, "entries left in the stream after the learner drained it"
    assert settled == produced, f"accounting does not balance: {acc}"
    assert acc.get("rejected_positions", 0) == 0, acc
    return acc


@pytest.fixture
def env(redis_server, tmp_path):
    url = redis_server.url
    procs: list[subprocess.Popen] = []
    yield url, connect(url), tmp_path, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_learner_and_two_workers_publish_versions_and_balance(env):
    url, r, run_dir, procs = env
    run = "e2e-basic"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    learner = _learner(url, run, run_dir)
    workers = [_worker(url, run, run_dir, f"w{i}") for i in range(2)]
    procs += [learner, *workers]
    _wait(lambda: _version(r, keys) >= 4, 180, "three versions after version 1", procs)
    assert len(status.read_workers(r, keys)) == 2
    assert r.xlen(keys.metrics) >= 3 and r.xlen(keys.games) > 0
    _stop_all(r, keys, workers, learner)
    acc = _assert_accounting_balances(r, keys)
    assert acc["trained_positions"] > 0
    ckpts = sorted((run_dir / run / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts, "no checkpoint written at shutdown"


def test_kill_9_worker_and_learner_then_resume_loses_nothing(env):
    url, r, run_dir, procs = env
    run = "e2e-kill"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    learner = _learner(url, run, run_dir)
    w0 = _worker(url, run, run_dir, "w0")
    procs += [learner, w0]
    _wait(lambda: _version(r, keys) >= 3, 180, "version 3", procs)
    w0.kill()  # kill -9 a worker mid-run: its unfinished games were never produced
    w0.wait()
    w1 = _worker(url, run, run_dir, "w1")
    procs.append(w1)

    def learner_holds_entries():
        info = status.stream_info(r, keys)
        return info.get("pending", 0) > 0

    _wait(learner_holds_entries, 120, "the learner holding unacknowledged entries", [learner, w1])
    learner.kill()  # kill -9 the learner between reading and acknowledging
    learner.wait()
    before = _version(r, keys)
    pending_before = status.stream_info(r, keys)["pending"]
    assert pending_before > 0
    learner2 = _learner(url, run, run_dir, "--resume")
    procs.append(learner2)
    _wait(lambda: _version(r, keys) > before + 1, 180, "new versions after the resume", [learner2, w1])
    _stop_all(r, keys, [w1], learner2)
    _assert_accounting_balances(r, keys)


def test_pause_then_stop_ends_worker_promptly(env):
    url, r, run_dir, procs = env
    run = "e2e-pause"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    learner = _learner(url, run, run_dir)
    worker = _worker(url, run, run_dir, "w0")
    procs += [learner, worker]

    def state():
        ws = status.read_workers(r, keys)
        return ws[0].get("state") if ws else None

    _wait(lambda: state() == "playing", 120, "the worker playing", procs)
    status.set_control(r, keys, "pause")
    _wait(lambda: state() == "paused", 30, "the worker paused", procs)
    t0 = time.monotonic()
    status.set_control(r, keys, "stop")
    assert worker.wait(15) == 0
    assert time.monotonic() - t0 < 10, "stop took too long while paused"
    learner.send_signal(signal.SIGTERM)
    assert learner.wait(90) == 0


def test_worker_started_before_learner_waits_for_version_1(env):
    url, r, run_dir, procs = env
    run = "e2e-early"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    worker = _worker(url, run, run_dir, "w0")
    procs.append(worker)
    # The config exists but no weights yet: the worker must wait, not play with random weights.
    cfg = load_config(TINY, [f"run.id={run}", f"run.dir={run_dir}"])
    r.set(keys.config, cfg.to_json())
    _wait(lambda: any(w.get("state") == "waiting_weights" for w in status.read_workers(r, keys)), 60,
          "the worker's waiting_weights heartbeat", [worker])
    time.sleep(2.0)
    assert r.xlen(keys.experience) == 0 and r.xlen(keys.games) == 0
    learner = _learner(url, run, run_dir)
    procs.append(learner)
    _wait(lambda: r.xlen(keys.games) >= 4, 120, "games after version 1", [learner, worker])
    versions = [int(f[b"version"]) for _, f in r.xrange(keys.games)]
    assert min(versions) >= 1
    _stop_all(r, keys, [worker], learner)
    _assert_accounting_balances(r, keys)
