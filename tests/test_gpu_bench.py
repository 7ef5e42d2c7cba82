"""``benchmarks/gpu.py``'s arithmetic and process handling on the CPU: the steady window on a
recorded metrics stream (a ``--cpu`` dry run's, ``tests/data/gpu_run_record.json``), the
``PYTHONPATH`` a child gets, and a timed-out child killed with its whole tree (its own session's
children included)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def _record():
    r = json.loads((ROOT / "tests" / "data" / "gpu_run_record.json").read_text())
    return r, [(t, m) for t, m in r["metrics"]], r["stop_t"], [tuple(x) for x in r["produced"]]


def test_the_steady_window_runs_from_the_first_update_to_the_stop_and_the_drain_is_apart():
    r, metrics, stop_t, produced = _record()
    s = gpu.steady_window(metrics, stop_t, produced)
    first_t = metrics[0][0]
    inside = [m for t, m in metrics[1:] if t <= stop_t]
    after = [(t, m) for t, m in metrics if t > stop_t]
    assert after, "the recorded run has updates after the stop (its drain)"
    trained = sum(int(float(m["trained_positions"])) for m in inside)
    assert s["first_update_t"] == first_t and s["updates"] == len(inside) == len(metrics) - 1 - len(after)
    assert s["trained_positions"] == trained
    assert s["trained_per_s"] == pytest.approx(trained / (stop_t - first_t), abs=0.1)
    # the whole run's average (the old figure: every position over the requested duration) differs
    everything = sum(int(float(m["trained_positions"])) for _, m in metrics)
    assert everything > trained
    assert s["drain"]["updates"] == len(after)
    assert s["drain"]["trained_positions"] == sum(int(float(m["trained_positions"])) for _, m in after)
    assert s["drain"]["seconds"] == pytest.approx(after[-1][0] - stop_t, abs=0.1)
    stale = sum(int(float(m["stale_positions"])) for m in inside)
    assert s["stale_share"] == pytest.approx(stale / (trained + stale), abs=1e-4)
    assert 0 < s["produced_per_s"]


def test_the_steady_window_arithmetic_on_a_small_hand_made_stream():
    metrics = [(100.0, {"trained_positions": "500", "stale_positions": "0"}),   # the first update: before the window
               (110.0, {"trained_positions": "1000", "stale_positions": "10"}),
               (120.0, {"trained_positions": "1000", "stale_positions": "0"}),
               (125.0, {"trained_positions": "300", "stale_positions": "0"})]   # after the stop: drain
    produced = [(95.0, 0), (100.0, 800), (120.0, 2800), (130.0, 3000)]
    s = gpu.steady_window(metrics, 121.0, produced)
    assert s["window_s"] == 21.0 and s["trained_positions"] == 2000 and s["updates"] == 2
    assert s["trained_per_s"] == pytest.approx(2000 / 21, abs=0.1)
    assert s["stale_share"] == pytest.approx(10 / 2010, abs=1e-4)
    assert s["produced_per_s"] == pytest.approx((2820 - 800) / 21, abs=0.1)
    assert s["drain"] == {"updates": 1, "trained_positions": 300, "seconds": 4.0}
    assert gpu.steady_window([], 1.0, [])["error"]


def test_children_get_this_checkout_prepended_to_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/site-packages-of-the-machine")
    env = gpu.child_env()
    assert env["PYTHONPATH"] == f"{ROOT}{os.pathsep}/opt/site-packages-of-the-machine"
    monkeypatch.delenv("PYTHONPATH")
    assert gpu.child_env()["PYTHONPATH"] == str(ROOT)


def test_a_timed_out_child_is_killed_with_its_whole_tree(tmp_path):
    """A child that starts a grandchild in a session of its own (as keisei run starts its
    workers) and hangs: both are gone after the timeout."""
    pidfile = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(300)'], start_new_session=True); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
              f"time.sleep(300)")
    t0 = time.monotonic()
    rc, out = gpu.run_child([sys.executable, "-c", script], timeout=3)
    assert rc is None and "killed after 3 s" in out and time.monotonic() - t0 < 30
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while gpu._alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not gpu._alive(grandchild)
