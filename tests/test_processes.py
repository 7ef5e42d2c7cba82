"""End-to-end: the real learner and worker processes against a real redis-server (tiny config).

Each test uses its own run id on the session's server, so tests never see each other's keys.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from keisei_stream.wire import status
from keisei_stream.config import load_config
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys
from tests.procs import (
    assert_accounting_balances, start_learner, start_worker, stop_all, wait_for, weights_version,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = [pytest.mark.redis, pytest.mark.slow]


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
    learner = start_learner(url, run, run_dir)
    workers = [start_worker(url, run, run_dir, f"w{i}") for i in range(2)]
    procs += [learner, *workers]
    wait_for(lambda: weights_version(r, keys) >= 4, 180, "three versions after version 1", procs)
    assert len(status.read_workers(r, keys)) == 2
    assert r.xlen(keys.metrics) >= 3 and r.xlen(keys.games) > 0
    stop_all(r, keys, workers, learner)
    acc = assert_accounting_balances(r, keys)
    assert acc["trained_positions"] > 0
    ckpts = sorted((run_dir / run / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts, "no checkpoint written at shutdown"


def test_kill_9_worker_and_learner_then_resume_loses_nothing(env):
    url, r, run_dir, procs = env
    run = "e2e-kill"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    learner = start_learner(url, run, run_dir)
    w0 = start_worker(url, run, run_dir, "w0")
    procs += [learner, w0]
    wait_for(lambda: weights_version(r, keys) >= 3, 180, "version 3", procs)
    w0.kill()  # kill -9 a worker mid-run: its unfinished games were never produced
    w0.wait()
    w1 = start_worker(url, run, run_dir, "w1")
    procs.append(w1)

    def learner_holds_entries():
        info = status.stream_info(r, keys)
        return info.get("pending", 0) > 0

    wait_for(learner_holds_entries, 120, "the learner holding unacknowledged entries", [learner, w1])
    learner.kill()  # kill -9 the learner between reading and acknowledging
    learner.wait()
    before = weights_version(r, keys)
    pending_before = status.stream_info(r, keys)["pending"]
    assert pending_before > 0
    learner2 = start_learner(url, run, run_dir, "--resume")
    procs.append(learner2)
    wait_for(lambda: weights_version(r, keys) > before + 1, 180, "new versions after the resume", [learner2, w1])
    stop_all(r, keys, [w1], learner2)
    assert_accounting_balances(r, keys)


def test_pause_then_stop_ends_worker_promptly(env):
    url, r, run_dir, procs = env
    run = "e2e-pause"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    learner = start_learner(url, run, run_dir)
    worker = start_worker(url, run, run_dir, "w0")
    procs += [learner, worker]

    def state():
        ws = status.read_workers(r, keys)
        return ws[0].get("state") if ws else None

    wait_for(lambda: state() == "playing", 120, "the worker playing", procs)
    status.set_control(r, keys, "pause")
    wait_for(lambda: state() == "paused", 30, "the worker paused", procs)
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
    worker = start_worker(url, run, run_dir, "w0")
    procs.append(worker)
    # The config exists but no weights yet: the worker must wait, not play with random weights.
    cfg = load_config(TINY, [f"run.id={run}", f"run.dir={run_dir}"])
    r.set(keys.config, cfg.to_json())
    wait_for(lambda: any(w.get("state") == "waiting_weights" for w in status.read_workers(r, keys)), 60,
          "the worker's waiting_weights heartbeat", [worker])
    time.sleep(2.0)
    assert status.stream_info(r, keys)["length"] == 0 and r.xlen(keys.games) == 0
    learner = start_learner(url, run, run_dir)
    procs.append(learner)
    wait_for(lambda: r.xlen(keys.games) >= 4, 120, "games after version 1", [learner, worker])
    versions = [int(f[b"version"]) for _, f in r.xrange(keys.games)]
    assert min(versions) >= 1
    stop_all(r, keys, [worker], learner)
    assert_accounting_balances(r, keys)
