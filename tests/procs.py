"""Real learner and worker processes for end-to-end and fault tests (tiny config)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from keisei_stream.wire import status

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def start_learner(url, run, run_dir, *extra):
    cmd = [sys.executable, "-m", "learner", "--config", str(TINY), "--redis", url, "--run", run,
           "--set", f"run.dir={run_dir}", "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(run_dir / f"learner-{run}-{time.time():.0f}.log", "ab"),
                            stderr=subprocess.STDOUT)


def start_worker(url, run, run_dir, wid, *extra):
    cmd = [sys.executable, "-m", "workers", "--redis", url, "--run", run, "--id", wid, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(run_dir / f"worker-{run}-{wid}.log", "ab"),
                            stderr=subprocess.STDOUT)


def wait_for(pred, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        for p in procs:
            assert p.poll() is None, f"process {p.args[:3]} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def weights_version(r, keys) -> int:
    v = r.hget(keys.weights_latest, "version")
    return int(v) if v is not None else 0


def stop_all(r, keys, workers, learner):
    status.set_control(r, keys, "stop")
    for w in workers:
        assert w.wait(30) == 0, "worker did not stop cleanly on control=stop"
    if learner is not None:
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(90) == 0, "learner did not stop cleanly on SIGTERM"


def assert_accounting_balances(r, keys):
    acc = status.read_accounting(r, keys)
    produced = acc.get("produced_positions", 0)
    settled = sum(acc.get(k, 0) for k in ("trained_positions", "stale_positions", "rejected_positions",
                                          "duplicate_positions"))
    assert produced > 0
    assert status.stream_info(r, keys)["length"] == 0, "entries left in the streams after the learner drained them"
    assert settled == produced, f"accounting does not balance: {acc}"
    assert acc.get("rejected_positions", 0) == 0, acc
    return acc


def start_learner_ranks(url, run, run_dir, ranks, *extra, restarts=2):
    """``ranks`` data-parallel learners under torchrun (as ``keisei run --learners`` starts them),
    in a new session so a test can signal the agent alone."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "--max-restarts", str(restarts), "-m", "learner", "--config", str(TINY), "--redis", url,
           "--set", f"run.id={run}", "--set", f"run.dir={run_dir}", "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(run_dir / f"torchrun-{run}.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
