"""The bottleneck rule of ``keisei status`` on recorded status figures (shapes as
``collect_status`` returns them: heartbeat dicts of strings, the learner hash, the stream info)."""

from __future__ import annotations

import math

import pytest

from keisei_stream.cli.bottleneck import diagnose, figures
from keisei_stream.cli.status import render_status


def _status(worker_states, wait_share, backlog=10, max_backlog=16, **learner):
    workers = [{"id": f"w{i}", "state": s, "alive": "1", "positions_per_s": "120.0", "backpressure_s": "3.5"}
               for i, s in enumerate(worker_states)]
    ln = {"state": "training", "version": "12", "updates": "11", "samples_per_s": "900.0",
          "time_share_wait": str(wait_share), "time_share_train": "0.7", **learner}
    return {"run": "r", "control": "run", "workers": workers, "learner": ln,
            "stream": {"length": backlog, "backlog": backlog, "pending": 2, "deadletter": 0, "max_backlog": max_backlog},
            "accounting": {"produced_positions": 1000, "trained_positions": 900}, "unsettled_positions": 100,
            "settled_positions": 900, "rating": None, "losses": [], "supervisor": {}, "redis_ping_ms": 0.3}


def test_workers_waiting_on_a_full_backlog_make_the_learner_the_bottleneck():
    # recorded from a quickstart run on 2 cores with 3 workers: two of three in backpressure
    v = diagnose(_status(["backpressure", "backpressure", "playing"], 0.01, backlog=15))
    assert v["limit"] == "learner" and "learner is likely the bottleneck" in v["line"]
    assert "67%" in v["line"] and "94%" in v["line"] and "ppo.epochs" in v["knob"]


def test_the_recent_share_on_backpressure_counts_not_the_state_of_the_instant():
    # the 30-minute quickstart (1 worker, 2 cores): the worker waited 1,237 of 1,800 s on backpressure,
    # yet a snapshot could find it playing with the backlog drained; its heartbeat's share tells
    st = _status(["playing"], 0.01, backlog=0)
    st["workers"][0]["backpressure_share"] = "0.69"
    v = diagnose(st)
    assert v["limit"] == "learner" and "69%" in v["line"]
    st["workers"][0].update(state="backpressure", backpressure_share="0.0")  # the share wins over the state
    assert figures(st)["workers_waiting"] == 0.0
    st["workers"][0]["backpressure_share"] = "x"  # unreadable: back to the state
    assert figures(st)["workers_waiting"] == 1.0


def test_a_worker_share_is_a_moving_average_of_time_waited(monkeypatch):
    import workers.worker as wmod

    clock = iter([10.0, 20.0, 20.5, 1000.0])
    monkeypatch.setattr(wmod.time, "monotonic", lambda: next(clock))
    ws = wmod.WorkerStats(rate_t0=0.0)
    ws.update_rate(waited_s=10.0)  # waited all of the first 10 s: the first sample sets the average
    assert ws.backpressure_share == 1.0
    ws.update_rate(waited_s=10.0)  # then 10 s without waiting: the average decays
    assert ws.backpressure_share == pytest.approx(math.exp(-10.0 / wmod.SHARE_TAU_S))
    before = ws.backpressure_share
    ws.update_rate(waited_s=10.5)  # under 1 s since the last sample: not sampled
    assert ws.backpressure_share == before
    ws.update_rate(waited_s=990.0)  # a long wait: the share tends to 1, never above
    assert 0.99 < ws.backpressure_share <= 1.0


def test_a_full_backlog_alone_also_says_learner():
    assert diagnose(_status(["playing", "playing"], 0.02, backlog=16))["limit"] == "learner"


def test_a_learner_waiting_for_data_with_free_workers_makes_the_workers_the_bottleneck():
    v = diagnose(_status(["playing"] * 4, 0.45, backlog=0))
    assert v["limit"] == "workers" and "45%" in v["line"] and "--workers" in v["knob"]


def test_neither_waiting_is_balanced_and_the_extras_are_named():
    v = diagnose(_status(["playing", "playing"], 0.1, backlog=4, gpu_util_pct="97.0", compile="compiling")
                 | {"redis_ping_ms": 12.5})
    assert v["limit"] == "balanced"
    assert "GPU utilisation 97 %" in v["line"] and "Redis round trip 12.5 ms" in v["line"]
    assert "eagerly until torch.compile is ready" in v["line"]


def test_no_update_or_no_worker_says_so():
    assert diagnose(_status(["playing"], 0.0) | {"learner": {"state": "waiting"}})["limit"] == "starting"
    assert diagnose(_status([], 0.3))["limit"] == "unknown"
    dead = _status(["backpressure"], 0.0)
    dead["workers"][0]["alive"] = "0"
    assert figures(dead)["workers"] == 0.0


def test_status_view_shows_the_verdict():
    from rich.console import Console

    st = _status(["backpressure", "backpressure"], 0.0, backlog=16)
    st["bottleneck"] = diagnose(st)
    console = Console(record=True, width=200)
    console.print(render_status(st))
    assert "bottleneck: the learner is likely the bottleneck" in console.export_text()
