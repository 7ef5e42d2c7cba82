"""The ``keisei`` command: duration parsing, ``status --json``, and a whole ``keisei run``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from keisei_stream.wire import status
from keisei_stream.cli.main import main, parse_duration
from keisei_stream.wire.keys import Keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("90", 90), ("0.5h", 1800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "30x", "m"])
def test_parse_duration_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@pytest.mark.redis
def test_status_json_reads_workers_learner_and_accounting(redis_server, capsys):
    from keisei_stream.wire.embedded_redis import connect

    r = connect(redis_server.url)
    keys = Keys("cli-status")
    status.write_worker_heartbeat(r, keys, "w7", {"state": "playing", "positions_per_s": 123.0,
                                                      "last_seen": 0}, 30)
    status.write_learner_status(r, keys, {"version": 5, "updates": 4})
    r.hincrby(keys.accounting, "produced_positions", 10)
    r.hincrby(keys.accounting, "trained_positions", 7)
    assert main(["status", "--redis", redis_server.url, "--run", "cli-status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert [w["id"] for w in st["workers"]] == ["w7"]
    assert st["learner"]["version"] == "5"
    assert st["unsettled_positions"] == 3


@pytest.mark.redis
@pytest.mark.slow
def test_keisei_run_end_to_end_stops_cleanly_and_balances(tmp_path):
    """The README's main command on the tiny config: private Redis, learner, a worker, a stop at
    --duration, a checkpoint, and a final accounting that balances exactly."""
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--workers", "1", "--duration", "25s", "--no-live", "--run", "cli-run",
           "--set", f"run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "cli-run"
    assert list((run_dir / "checkpoints").glob("ckpt_*.pt"))
    st = json.loads((run_dir / "final_status.json").read_text())
    acc = st["accounting"]
    assert acc["produced_positions"] > 0
    assert st["stream"]["length"] == 0 and st["unsettled_positions"] == 0, st
    assert int(st["learner"]["version"]) >= 2
    assert not (run_dir / "redis.url").exists(), "the private Redis was not cleaned up"
