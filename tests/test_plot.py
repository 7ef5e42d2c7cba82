"""``keisei plot`` on a recorded run: the metrics and the Elo table of a real 3-minute quickstart
run with ``keisei run --eval`` (tests/data/run_metrics.jsonl, tests/data/run_elo_table.json, as
the learner and the evaluator wrote them), drawn from a live run's Redis (the metrics stream
replayed into fakeredis with the recorded entry times) and from a finished run's files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from keisei_stream.cli import plot
from keisei_stream.cli.main import main
from keisei_stream.play.evaluation.follow import elo_key
from keisei_stream.wire import client
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import METRICS_FILE, read_metrics, read_metrics_file

pytest.importorskip("matplotlib")

DATA = Path(__file__).parent / "data"
PNG = b"\x89PNG\r\n\x1a\n"


def _recorded() -> tuple[list[dict], dict]:
    return read_metrics_file(DATA / "run_metrics.jsonl"), json.loads((DATA / "run_elo_table.json").read_text())


def _finished_run(tmp_path: Path) -> Path:
    rd = tmp_path / "quickstart"
    (rd / "eval").mkdir(parents=True)
    shutil.copy(DATA / "run_metrics.jsonl", rd / METRICS_FILE)
    shutil.copy(DATA / "run_elo_table.json", rd / "eval" / "elo_table.json")
    return rd


def test_the_learning_curve_draws_every_update(tmp_path):
    metrics, _ = _recorded()
    fig = plot.learning_curve(metrics, "quickstart")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for t, _ in plot.CURVE_PANELS]
    trained = fig.axes[0].lines[0].get_ydata()
    assert len(trained) == len(metrics) and trained[-1] == sum(m["trained_positions"] for m in metrics)
    entropy = list(fig.axes[4].lines[0].get_ydata())
    assert entropy == [m["entropy"] for m in metrics]
    minutes = fig.axes[4].lines[0].get_xdata()
    assert minutes[0] == pytest.approx(metrics[0]["time_to_first_update_s"] / 60)  # since the learner started
    assert [line.get_label() for line in fig.axes[5].lines] == ["policy_lag_mean", "policy_lag_max"]


def test_the_elo_curve_draws_every_evaluated_version(tmp_path):
    _, table = _recorded()
    rows = table["versions"]
    fig = plot.elo_curve(rows, "quickstart")
    rating, scores = fig.axes
    assert list(rating.lines[0].get_xdata()) == [r["version"] for r in rows]
    assert list(rating.lines[0].get_ydata()) == [r["elo"] for r in rows]
    by_label = {line.get_label(): list(line.get_ydata()) for line in scores.lines}
    assert by_label["vs random"] == [100 * r["matches"]["random"]["score"] for r in rows]
    unbounded = [dict(rows[0], elo_hi=None)]  # a version that lost no game: drawn, not an error
    assert plot.elo_curve(unbounded, "quickstart").axes[0].get_ylim()[1] > rows[0]["elo"]


def test_plot_a_finished_run_from_its_files(tmp_path, capsys):
    rd = _finished_run(tmp_path)
    assert main(["plot", "--run", "quickstart", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "18 update(s), 3 evaluated version(s)" in out and METRICS_FILE in out
    for name in ("learning_curve.png", "elo.png"):
        assert (rd / "plots" / name).read_bytes()[:8] == PNG
    assert main(["plot", "--run", "quickstart", "--runs-dir", str(tmp_path), "--format", "svg",
                 "--out", str(tmp_path / "svg")]) == 0
    assert (tmp_path / "svg" / "elo.svg").read_text().lstrip().startswith("<?xml")


def test_plot_a_live_run_from_its_redis(tmp_path, monkeypatch, fake_redis, capsys):
    """The recorded entries replayed into the metrics stream at their recorded times, and the Elo
    table into the elo hash: the command reads Redis, not the (absent) files."""
    metrics, table = _recorded()
    keys = Keys("quickstart")
    for m in metrics:
        fields = {k: v for k, v in m.items() if k != "time" and not (isinstance(v, float) and math.isnan(v))}
        fake_redis.xadd(keys.metrics, {k: repr(v) if isinstance(v, float) else v for k, v in fields.items()},
                        id=f"{int(m['time'] * 1000)}-0")
    for row in table["versions"]:
        fake_redis.hset(elo_key("quickstart"), f"v:{row['version']:08d}", json.dumps(row))
    back = read_metrics(fake_redis, keys, page=5)  # several pages
    assert [m["updates"] for m in back] == [m["updates"] for m in metrics]
    assert [m["time"] for m in back] == pytest.approx([m["time"] for m in metrics], abs=1e-3)
    monkeypatch.setattr(client, "connect", lambda url, **kw: fake_redis)
    assert main(["plot", "--run", "quickstart", "--runs-dir", str(tmp_path), "--redis", "fake://"]) == 0
    assert "from the Redis at fake://" in capsys.readouterr().out
    assert (tmp_path / "quickstart" / "plots" / "elo.png").read_bytes()[:8] == PNG


def test_a_run_without_metrics_or_ratings_says_so(tmp_path, capsys):
    assert main(["plot", "--run", "nothing", "--runs-dir", str(tmp_path), "--source", "files"]) == 1
    assert "keisei run --eval" in capsys.readouterr().out


def test_the_learner_writes_the_metrics_file_as_the_stream(tmp_path, fake_redis):
    """The learner's metrics sinks: the stream entry and the file line carry the same fields
    (non-finite numbers as null in the file)."""
    from keisei_stream.config import load_config
    from learner.report import MetricsSinks

    cfg = load_config(None, ["learner.tensorboard=false"])
    sinks = MetricsSinks(cfg, fake_redis, Keys("m"), tmp_path, quiet=True)
    recorded = {k: v for k, v in _recorded()[0][0].items() if k not in ("time", "version", "updates")}
    sinks.emit(1, 2, {**recorded, "policy_loss": 0.5, "entropy": float("nan")})
    sinks.close()
    line = read_metrics_file(tmp_path / METRICS_FILE)[0]
    entry = read_metrics(fake_redis, Keys("m"))[0]
    assert line["version"] == entry["version"] == 2 and line["policy_loss"] == entry["policy_loss"] == 0.5
    assert math.isnan(line["entropy"]) and abs(line["time"] - entry["time"]) < 5
