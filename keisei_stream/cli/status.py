"""``keisei status``: one view of a run from Redis: workers, learner, stream, position
accounting and the latest rating (once, ``--watch``, or ``--json``)."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Group
from rich.live import Live
from rich.table import Table

from keisei_stream.cli.common import make_console, resolve_redis
from keisei_stream.play.follow import latest_rating
from keisei_stream.wire import embedded_redis, status
from keisei_stream.wire.keys import Keys


def collect_status(r, run_id: str) -> dict:
    """Everything ``keisei status`` shows, as plain data (also printed by ``--json``).

    Returns:
        ``run``, ``control``, ``workers`` (list of heartbeat dicts plus ``age_s``, seconds since
        last seen), ``learner``, ``stream``, ``accounting`` (dicts as wire.status reads them),
        ``settled_positions``, ``unsettled_positions`` (ints), ``rating``
        (:func:`keisei_stream.play.follow.latest_rating`, or None).

    Raises:
        redis.RedisError: Redis unreachable.
    """
    keys = Keys(run_id)
    now = time.time()
    workers = status.read_workers(r, keys)
    for w in workers:
        seen = float(w.get("last_seen", 0) or 0)
        w["age_s"] = round(now - seen, 1)
    learner = status.read_learner_status(r, keys)
    stream = status.stream_info(r, keys)
    acc = status.read_accounting(r, keys)
    control = status.get_control(r, keys)
    try:
        rating = latest_rating(r, run_id)
    except (ValueError, KeyError, TypeError):  # a malformed Elo entry; status must still show
        rating = None
    produced = acc.get("produced_positions", 0)
    settled = (acc.get("trained_positions", 0) + acc.get("stale_positions", 0)
               + acc.get("rejected_positions", 0) + acc.get("duplicate_positions", 0))
    return {"run": run_id, "control": control, "workers": workers, "learner": learner,
            "stream": stream, "accounting": acc, "settled_positions": settled,
            "unsettled_positions": produced - settled, "rating": rating}


def render_status(st: dict) -> Group:
    """A rich renderable (tables) of :func:`collect_status`'s data."""
    wt = Table(title=f"run {st['run']}  (control: {st['control']})", title_justify="left")
    for col in ("worker", "state", "alive", "positions/s", "games", "positions", "version", "backpressure s", "host:pid"):
        wt.add_column(col, justify="right" if col not in ("worker", "state", "host:pid") else "left")
    for w in st["workers"]:  # read_workers sorts them by id
        alive = "yes" if w.get("age_s", 1e9) < 10 else f"? {w.get('age_s')}s"
        wt.add_row(str(w.get("id")), str(w.get("state", "")), alive, str(w.get("positions_per_s", "")),
                   str(w.get("games", "")), str(w.get("positions", "")), str(w.get("version", "")),
                   str(w.get("backpressure_s", "")), f"{w.get('host', '')}:{w.get('pid', '')}")
    if not st["workers"]:
        wt.add_row("(no live workers)", "", "", "", "", "", "", "", "")

    lt = Table(title="learner", title_justify="left")
    ln = st["learner"]
    for col in ("state", "version", "updates", "samples/s", "policy lag", "policy loss", "value loss",
                "entropy", "approx KL", "decisive", "game plies"):
        lt.add_column(col, justify="right")

    def f(key, fmt="{:.3f}"):
        v = ln.get(key)
        try:
            return fmt.format(float(v))
        except (TypeError, ValueError):
            return "-" if v is None else str(v)

    lt.add_row(str(ln.get("state", "-")), str(ln.get("version", "-")), str(ln.get("updates", "-")),
               f("samples_per_s", "{:.0f}"), f("policy_lag_mean", "{:.2f}"), f("policy_loss", "{:.4f}"),
               f("value_loss", "{:.4f}"), f("entropy"), f("approx_kl", "{:.4f}"), f("decisive_rate", "{:.2f}"),
               f("game_plies_mean", "{:.0f}"))

    s = st["stream"]
    a = st["accounting"]
    at = Table(title="stream and position accounting", title_justify="left")
    for col in ("entries", "backlog", "pending", "dead-letter", "produced", "trained", "stale",
                "rejected", "duplicate", "not yet settled", "discarded at stop"):
        at.add_column(col, justify="right")
    at.add_row(str(s.get("length", "-")), str(s.get("backlog", "-")), str(s.get("pending", "-")),
               str(s.get("deadletter", "-")), str(a.get("produced_positions", 0)), str(a.get("trained_positions", 0)),
               str(a.get("stale_positions", 0)), str(a.get("rejected_positions", 0)),
               str(a.get("duplicate_positions", 0)), str(st["unsettled_positions"]),
               str(a.get("worker_discarded_positions", 0)))
    parts = [wt, lt, at]
    if st.get("rating"):
        rt = Table(title="latest rating (random mover = 0)", title_justify="left")
        for k in st["rating"]:
            rt.add_column(str(k), justify="right")
        rt.add_row(*[str(v) for v in st["rating"].values()])
        parts.append(rt)
    return Group(*parts)


def command(args: argparse.Namespace) -> int:
    """``keisei status``: returns 0 (Ctrl-C ends ``--watch``)."""
    r = embedded_redis.connect(resolve_redis(args))
    console = make_console()
    if args.json:
        print(json.dumps(collect_status(r, args.run), default=str, indent=2))
        return 0
    if not args.watch:
        console.print(render_status(collect_status(r, args.run)))
        return 0
    try:
        with Live(render_status(collect_status(r, args.run)), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(args.interval)
                live.update(render_status(collect_status(r, args.run)))
    except KeyboardInterrupt:
        return 0
