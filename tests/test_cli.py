"""The ``keisei`` command: duration parsing, ``status --json``, a whole ``keisei run``, and what still
answers after it has stopped (status, games, Elo table) without any Redis."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cshogi
import pytest
from cshogi import CSA, KIF

from keisei_stream.cli.main import main, parse_duration
from keisei_stream.wire import status
from keisei_stream.wire.archive import read_archive
from keisei_stream.wire.client import connect
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


def test_status_of_a_stopped_run_shows_the_saved_final_status(tmp_path, capsys):
    run = tmp_path / "old"
    run.mkdir()
    assert main(["status", "--run", "old", "--runs-dir", str(tmp_path)]) == 1
    assert "no saved final status" in capsys.readouterr().err
    st = {"run": "old", "control": "stop", "workers": [], "learner": {"version": "7", "state": "stopped"},
          "stream": {"length": 0}, "accounting": {"produced_positions": 5}, "settled_positions": 5,
          "unsettled_positions": 0, "rating": None}
    (run / "final_status.json").write_text(json.dumps(st))
    os.utime(run / "final_status.json", (1_700_000_000, 1_700_000_000))
    (run / "redis.url").write_text(f"unix://{tmp_path}/gone.sock\n")  # a killed run's leftover
    assert main(["status", "--run", "old", "--runs-dir", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stopped"] is True and d["stopped_at_unix"] == 1_700_000_000 and d["learner"]["version"] == "7"
    assert d["stopped_at"].startswith("2023-11-1") and d["files"]["checkpoint"] is None
    assert main(["status", "--run", "old", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run old is stopped" in out and "stopped at 2023-11-1" in out and "final status" in out


# ------------------------------------------------------------------------------------------------
# a whole `keisei run`, then everything that must still answer after it has stopped


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short `keisei run --eval` of configs/tiny.yaml (private Redis, learner, one worker, the
    continuous evaluation of every version in 2 games against random, 25 s), and the worker killed
    (-9) once, after version 2: `keisei run` restarts it; returns the runs dir once it has stopped."""
    runs = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--workers", "1", "--duration", "25s", "--no-live", "--run", "cli-run", "--eval",
           "--set", f"run.dir={runs}", "--set", "eval.every_versions=1", "--set", "eval.games=2",
           "--set", "eval.opponents=[random]"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (runs / "cli-run" / "redis.url").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    killed = None
    try:
        r = connect((runs / "cli-run" / "redis.url").read_text().strip())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and int(r.hget(Keys("cli-run").weights_latest, "version") or 0) < 2:
            time.sleep(0.3)
        pids = _pids_of("-m workers", "--run cli-run")
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        r.close()
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    log = runs / "cli-run" / "logs" / "evaluator.out"
    return {"runs": runs, "dir": runs / "cli-run", "rc": run.returncode, "out": out,
            "follower_out": log.read_text() if log.exists() else "", "killed": killed}


def _pids_of(*needles: str) -> list[int]:
    """Processes whose command line holds every one of ``needles``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") if d.name.isdigit() else ""
        except OSError:
            continue
        if cmd and all(n in cmd for n in needles):
            out.append(int(d.name))
    return out


@pytest.mark.redis
@pytest.mark.slow
def test_keisei_run_end_to_end_stops_cleanly_and_balances(finished_run):
    """The main command (keisei run) on the tiny config: private Redis, learner, a worker, a stop at
    --duration, a checkpoint, and a final accounting that balances exactly."""
    assert finished_run["rc"] == 0, finished_run["out"][-3000:]
    run_dir = finished_run["dir"]
    assert list((run_dir / "checkpoints").glob("ckpt_*.pt"))
    st = json.loads((run_dir / "final_status.json").read_text())
    acc = st["accounting"]
    assert acc["produced_positions"] > 0
    assert st["stream"]["length"] == 0 and st["unsettled_positions"] == 0, st
    assert int(st["learner"]["version"]) >= 2
    assert not (run_dir / "redis.url").exists(), "the private Redis was not cleaned up"
    # the worker killed by the fixture was restarted, and the restart counted in the status
    assert finished_run["killed"] is not None
    assert st["supervisor"]["worker_restarts"] >= 1 and st["supervisor"]["restarts:w0"] >= 1, st["supervisor"]
    assert "w0 restarted" in finished_run["out"]


def _after(finished_run, *argv) -> list[str]:
    return [*argv, "--run", "cli-run", "--runs-dir", str(finished_run["runs"])]


@pytest.mark.redis
@pytest.mark.slow
def test_finished_run_status_games_and_elo_answer_without_redis(finished_run, capsys, tmp_path):
    """After `keisei run` has stopped its private Redis: status, games list/export (KIF and CSA,
    re-parsed by cshogi to the archived moves) and eval --table answer from the run directory."""


    assert finished_run["rc"] == 0, finished_run["out"][-3000:]
    assert not (finished_run["dir"] / "redis.url").exists()
    # status: the saved final status, marked stopped
    assert main(_after(finished_run, "status", "--json")) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["stopped"] is True and st["stopped_at"] and st["run"] == "cli-run"
    assert st["unsettled_positions"] == 0 and st["files"]["checkpoint"]
    assert main(_after(finished_run, "status")) == 0
    assert "run cli-run is stopped" in capsys.readouterr().out
    # games: every finished self-play game is in the archive
    rows = list(read_archive(finished_run["dir"] / "games"))
    assert rows and len(rows) == int(st["learner"]["games_archived"])
    assert main(_after(finished_run, "games", "list", "--count", "5")) == 0
    out = capsys.readouterr().out
    assert rows[-1]["id"].replace("-", "_") in out and "from the archive" in out
    moves = {r["id"].replace("-", "_"): r["moves"].split() for r in rows}
    for fmt, parse in (("kif", lambda p: KIF.Parser.parse_file(str(p)).moves),
                       ("csa", lambda p: CSA.Parser.parse_file(str(p))[0].moves)):
        assert main(_after(finished_run, "games", "export", "--format", fmt, "--count", "20",
                           "--out", str(tmp_path / fmt))) == 0
        files = sorted((tmp_path / fmt).glob(f"*.{fmt}"))
        assert len(files) == min(20, len(rows))
        for f in files:
            assert [cshogi.move_to_usi(m) for m in parse(f)] == moves[f.stem], f
    # the Elo table the evaluator (keisei run --eval) saved, and its clean stop at control=stop
    assert "the evaluator" in finished_run["out"] and "evaluated " in finished_run["follower_out"], \
        finished_run["follower_out"][-3000:]
    assert "evaluator exited" not in finished_run["out"]  # never restarted: it stopped on control=stop
    saved = json.loads((finished_run["dir"] / "eval" / "elo_table.json").read_text())
    assert saved["versions"], finished_run["follower_out"][-3000:]
    assert main(_after(finished_run, "eval", "--table")) == 0
    cap = capsys.readouterr()
    assert "saved in" in cap.err and f"│ {saved['versions'][0]['version']:>7} │" in cap.out
    assert len((finished_run["dir"] / "eval" / "eval.jsonl").read_text().splitlines()) == len(saved["versions"])


@pytest.mark.redis
@pytest.mark.slow
def test_finished_run_archived_every_game(finished_run):
    """Every game whose positions a worker sent is in the archive (a worker's ``games`` counts only
    those; a game that ended just before the stop is recorded although its positions were discarded)."""
    st = json.loads((finished_run["dir"] / "final_status.json").read_text())
    rows = list(read_archive(finished_run["dir"] / "games"))
    if not st["workers"]:  # heartbeats expired (TTL) before the final status was taken
        pytest.skip("no worker heartbeat in the final status")
    assert len(rows) >= sum(int(w.get("games", 0)) for w in st["workers"]), (len(rows), st["workers"])


def test_keisei_run_starts_several_learner_ranks_under_torchrun():
    """``--learners 2``: the learner command is torchrun's, with the restarts and the stop
    timeout, and the run id as an override (torchrun's parser would take ``--run``)."""
    from keisei_stream.cli.run import learner_command

    args = argparse.Namespace(learners=2, learner_restarts=5, learner_stop_timeout=120.0, config="c.yaml",
                              overrides=["ppo.epochs=2"], resume=True)
    cmd = learner_command(args, "r1")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "5"
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "120"
    tail = cmd[cmd.index("learner") - 1:]
    assert tail[:2] == ["-m", "learner"] and "--run" not in tail and "run.id=r1" in tail and "ppo.epochs=2" in tail
    assert tail[-1] == "--resume" and "--redis" not in cmd  # the URL (with a password) goes in the environment
    one = learner_command(argparse.Namespace(**{**vars(args), "learners": 1}), "r1")
    assert one[1:3] == ["-m", "learner"]
