"""``keisei plot``: the pictures a run makes of itself, from a live run's Redis or from what a
finished run left in its directory.

- **The learning curve** (``learning_curve.png``): per update, against minutes since the learner
  started, the trained positions (cumulative), the trained positions per second, the policy and
  value losses, the entropy of the policy and the policy lag (mean and max) of the trained
  positions. From the ``metrics`` stream while the run's Redis answers, else from the learner's
  copy of it, ``runs/{run}/metrics.jsonl`` (:data:`keisei_stream.wire.status.METRICS_FILE`).
- **The Elo over versions** (``elo.png``): the rating of every evaluated version on the scale where
  the uniformly random mover is 0, with its 95 % interval, and the score against each opponent.
  From the ``elo`` hash (joined with the saved table) while Redis answers, else from
  ``runs/{run}/eval/elo_table.json``; both are written by the continuous evaluation
  (``keisei eval --follow``, or ``keisei run --eval``).

matplotlib is an optional dependency (the ``plot`` extra): without it the command says how to
install it and exits with 2.
"""

from __future__ import annotations

import argparse
import math
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

from keisei_stream.cli.common import find_redis, make_console, run_dir
from keisei_stream.play.evaluation.follow import elo_table, merge_tables, saved_elo_table
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import METRICS_FILE, read_metrics, read_metrics_file

#: The learning curve's panels: (title, metric keys drawn in it).
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("trained positions (cumulative)", ("trained_positions",)),
    ("trained positions / s", ("samples_per_s",)),
    ("policy loss", ("policy_loss",)),
    ("value loss", ("value_loss",)),
    ("entropy of the policy (nats)", ("entropy",)),
    ("policy lag (versions)", ("policy_lag_mean", "policy_lag_max")),
)


def command(args: argparse.Namespace) -> int:
    """``keisei plot``: writes the pictures into ``--out`` (default ``runs/{run}/plots``).

    Returns:
        0 when at least one picture was written, 1 when the run has neither metrics nor an Elo
        table, 2 when matplotlib is missing.
    """
    console = make_console()
    try:
        import matplotlib
    except ImportError:
        console.print("[red]error:[/red] keisei plot needs matplotlib: pip install 'keisei-stream[plot]'")
        return 2
    matplotlib.use("Agg")
    metrics, ratings, source = load_run(args)
    console.print(f"run {args.run}: {len(metrics)} update(s), {len(ratings)} evaluated version(s) {source}",
                  highlight=False)
    out = Path(args.out) if args.out else run_dir(args) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if metrics:
        written.append(save(learning_curve(metrics, args.run, args.note), out / f"learning_curve.{args.format}"))
    if ratings:
        written.append(save(elo_curve(ratings, args.run, args.note), out / f"elo.{args.format}"))
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    if not ratings:
        console.print("no Elo over versions: run the continuous evaluation beside the run "
                      "(keisei run --eval, or keisei eval --follow)", highlight=False)
    return 0 if written else 1


def load_run(args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """``(metrics, ratings, where they came from)``: the run's Redis when it answers (``--source
    auto`` or ``redis``), else the run directory's files (``auto`` or ``files``).

    Raises:
        SystemExit: ``--source redis`` and the run's Redis does not answer.
    """
    rd = run_dir(args)
    saved = saved_elo_table(rd / "eval") if (rd / "eval").exists() else []
    if args.source != "files":
        rr = find_redis(args)
        if rr.client is not None:
            live = elo_table(rr.client, args.run)
            return read_metrics(rr.client, Keys(args.run)), merge_tables(saved, live), f"from the Redis at {rr.url}"
        if args.source == "redis":
            raise SystemExit(f"error: --source redis: {rr.why}")
    path = rd / METRICS_FILE
    metrics = read_metrics_file(path) if path.exists() else []
    return metrics, saved, f"from {rd} ({METRICS_FILE}, eval/)"


def _values(rows: Sequence[dict], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]


def learning_curve(metrics: Sequence[dict[str, Any]], run: str, note: str = ""):
    """The learning curve (module docstring) of ``metrics`` (one dict per update, oldest first,
    with ``time`` in unix seconds) as a matplotlib Figure of :data:`CURVE_PANELS`.

    The x axis is minutes since the learner started: the first update's time less its
    ``time_to_first_update_s`` (0 when absent)."""
    import matplotlib.pyplot as plt

    first = metrics[0]
    start = first["time"] - (first.get("time_to_first_update_s") or 0.0)
    start = first["time"] if math.isnan(start) else start
    minutes = [(m["time"] - start) / 60.0 for m in metrics]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True, layout="constrained")
    for ax, (title, keys) in zip(axes.flat, CURVE_PANELS):
        for key in keys:
            ys = _values(metrics, key)
            if key == "trained_positions":
                ys = list(accumulate(0.0 if math.isnan(y) else y for y in ys))
            ax.plot(minutes, ys, label=key, linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the learner started")
    last = metrics[-1]
    fig.suptitle(f"run {run}: {len(metrics)} updates, version {int(last.get('version', 0))}"
                 + (f"\n{note}" if note else ""), fontsize=11)
    return fig


def elo_curve(ratings: Sequence[dict[str, Any]], run: str, note: str = ""):
    """The Elo over versions (module docstring) of ``ratings`` (the Elo table's rows: ``version``,
    ``elo``, ``elo_lo``, ``elo_hi`` (None when unbounded), ``matches``: opponent -> ``score``...)
    as a matplotlib Figure: the rating with its 95 % interval, and the score per opponent."""
    import matplotlib.pyplot as plt

    versions = [int(r["version"]) for r in ratings]
    elo = _values(ratings, "elo")
    # an unbounded side of the interval (no loss, or no win) is drawn up to the plot's edge
    span = max((abs(e) for e in elo if not math.isnan(e)), default=100.0) + 200.0
    lo = [e - (r["elo_lo"] if r.get("elo_lo") is not None else -span) for e, r in zip(elo, ratings)]
    hi = [(r["elo_hi"] if r.get("elo_hi") is not None else span) - e for e, r in zip(elo, ratings)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    ax.errorbar(versions, elo, yerr=[lo, hi], fmt="o-", capsize=3, linewidth=1.2, label="rating, 95 % interval")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylim(-span, span)
    ax.set_xlabel("version")
    ax.set_ylabel("Elo (uniformly random mover = 0)")
    ax.set_title("Elo over versions", fontsize=10)
    ax.grid(alpha=0.3)
    opponents = sorted({o for r in ratings for o in r.get("matches", {})})
    for opp in opponents:
        pts = [(int(r["version"]), 100.0 * r["matches"][opp]["score"]) for r in ratings if opp in r.get("matches", {})]
        bx.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"vs {opp}", linewidth=1.2)
    bx.set_ylim(-2, 102)
    bx.set_xlabel("version")
    bx.set_ylabel("score % (draws count half)")
    bx.set_title("score against each opponent", fontsize=10)
    bx.grid(alpha=0.3)
    if opponents:
        bx.legend(fontsize=8)
    games = sum(int(r.get("games", 0)) for r in ratings)
    fig.suptitle(f"run {run}: {len(ratings)} evaluated versions, {games} games" + (f"\n{note}" if note else ""),
                 fontsize=11)
    return fig


def save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (the format from its suffix) and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
