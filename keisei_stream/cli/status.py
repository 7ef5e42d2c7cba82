"""``keisei status``: one view of a run from Redis: workers, learner, streams, position
accounting (in all and per worker, with each worker's credit and what its credential did to its
own keys) and the latest rating (once, ``--watch``, or ``--json``).

When the run's Redis does not answer (a finished local run: ``keisei run`` stops its private Redis
and removes ``redis.url``), the final status that ``keisei run`` saved in
``runs/{run}/final_status.json`` is shown instead, marked as stopped with the time it stopped (the
file's modification time) and what the run left on disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from keisei_stream.cli.bottleneck import diagnose, parse_float
from keisei_stream.cli.common import find_redis, make_console, run_dir
from keisei_stream.play.evaluation.follow import ELO_TABLE, EVAL_LOG, latest_rating, saved_elo_table, saved_latest_rating
from keisei_stream.wire import archive, status
from keisei_stream.wire.keys import CONFINED_FIELDS, Keys

#: the file ``keisei run`` writes at its end (:mod:`keisei_stream.cli.run`), read back here
FINAL_STATUS = "final_status.json"


def collect_status(r, run_id: str) -> dict:
    """Everything ``keisei status`` shows, as plain data (also printed by ``--json``).

    Returns:
        ``run``, ``control``, ``workers`` (list of heartbeat dicts plus ``age_s``, seconds since
        last seen), ``learner``, ``stream``, ``accounting`` (dicts as wire.status reads them),
        ``settled_positions``, ``unsettled_positions`` (ints), ``rating``
        (:func:`keisei_stream.play.evaluation.follow.latest_rating`, or None), ``losses`` (the newest 20
        entries of the ``losses`` stream: Redis restarts that lost the run's data),
        ``supervisor`` (``keisei run``'s restart counts: ``worker_restarts``, ``restarts:{id}``),
        ``redis_ping_ms`` (one ``PING``'s round trip), ``bottleneck``
        (:func:`keisei_stream.cli.bottleneck.diagnose`: what limits the run now, and the knob),
        ``roster`` (the workers whose streams the learner reads) and ``per_worker``
        (:func:`per_worker`); ``stream`` also holds the config's ``max_backlog``.

    Raises:
        redis.RedisError: Redis unreachable.
    """
    keys = Keys(run_id)
    t0 = time.perf_counter()
    r.ping()
    ping_ms = (time.perf_counter() - t0) * 1000.0
    now = time.time()
    workers = status.read_workers(r, keys)
    for w in workers:
        seen = float(w.get("last_seen", 0) or 0)
        w["age_s"] = round(now - seen, 1)
    learner = status.read_learner_status(r, keys)
    roster = status.read_roster(r, keys)
    stream = status.stream_info(r, keys, roster)
    try:
        stream["max_backlog"] = json.loads(status.read_config(r, keys) or "{}").get("stream", {}).get("max_backlog")
    except ValueError:
        stream["max_backlog"] = None
    acc = status.read_accounting(r, keys)
    control = status.get_control(r, keys)
    try:
        rating = latest_rating(r, run_id)
    except (ValueError, KeyError, TypeError):  # a malformed Elo entry; status must still show
        rating = None
    produced = acc.get("produced_positions", 0)
    settled = (acc.get("trained_positions", 0) + acc.get("stale_positions", 0)
               + acc.get("rejected_positions", 0) + acc.get("duplicate_positions", 0))
    losses = [fields for _id, fields in status.read_stream(r, keys.losses, 20)]
    st = {"run": run_id, "control": control, "workers": workers, "learner": learner,
          "stream": stream, "accounting": acc, "settled_positions": settled,
          "unsettled_positions": produced - settled, "rating": rating, "losses": losses,
          "supervisor": status.read_supervisor(r, keys), "redis_ping_ms": round(ping_ms, 3), "roster": roster,
          "per_worker": per_worker(r, keys, roster, stream)}
    st["bottleneck"] = diagnose(st)
    return st
def per_worker(r, keys: Keys, roster: list[str], stream: dict) -> dict[str, dict]:
    """Per worker (on the roster, or with a record or a count): ``in_roster``, ``credit`` (the
    entries it may hold, None when none is published), ``stream_entries`` (its stream's XLEN),
    its accounting (:func:`keisei_stream.wire.status.read_worker_accounting`: produced, trained,
    stale, rejected, duplicate, unsettled...) and the ``confined`` counters (what its credential
    did to its own keys, :data:`keisei_stream.wire.keys.CONFINED_FIELDS`), and ``lost_reason``
    (why its last failover-lost adds were counted, from its record; empty when none)."""
    producers = status.read_producers(r, keys)
    acc = status.read_worker_accounting(r, keys, producers)
    credit, confined = status.read_credit(r, keys), status.read_confined(r, keys)
    out = {}
    for w in sorted(set(roster) | set(acc) | set(confined)):
        out[w] = {"in_roster": w in roster, "credit": credit.get(w),
                  "stream_entries": stream.get("workers", {}).get(w, {}).get("length"),
                  **acc.get(w, {}), **confined.get(w, dict.fromkeys(CONFINED_FIELDS, 0)),
                  "lost_reason": producers.get(w, {}).get("lost_reason", "")}
    return out


def _waited(w: dict) -> str:
    """A worker's backpressure cell: seconds waited in all, and the recent share when its heartbeat has it."""
    waited, share = str(w.get("backpressure_s", "")), parse_float(w.get("backpressure_share"))
    return waited if share is None else f"{waited} ({share:.0%})"


def render_status(st: dict, stopped: bool = False) -> Group:
    """A rich renderable (tables) of :func:`collect_status`'s data; ``stopped``: the data is a
    stopped run's saved final status (no worker is alive)."""
    state = "stopped, final status" if stopped else f"control: {st['control']}"
    wt = Table(title=f"run {st['run']}  ({state})", title_justify="left")
    sv = st.get("supervisor") or {}
    for col in ("worker", "state", "alive", "positions/s", "games", "positions", "version", "backpressure s (recent)",
                "restarts", "host:pid"):
        wt.add_column(col, justify="right" if col not in ("worker", "state", "host:pid") else "left")
    for w in st["workers"]:  # read_workers sorts them by id
        alive = "no (stopped)" if stopped else "yes" if w.get("alive", "1") == "1" else f"no (seen {w.get('age_s')}s ago)"
        wt.add_row(str(w.get("id")), str(w.get("state", "")), alive, str(w.get("positions_per_s", "")),
                   str(w.get("games", "")), str(w.get("positions", "")), str(w.get("version", "")),
                   _waited(w), str(sv.get(f"restarts:{w.get('id')}", 0)),
                   f"{w.get('host', '')}:{w.get('pid', '')}")
    if not st["workers"]:
        wt.add_row("(no live workers)", "", "", "", "", "", "", "", "", "")

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
                "rejected", "duplicate", "not yet settled", "discarded at stop", "lost in failovers"):
        at.add_column(col, justify="right")
    at.add_row(str(s.get("length", "-")), str(s.get("backlog", "-")), str(s.get("pending", "-")),
               str(s.get("deadletter", "-")), str(a.get("produced_positions", 0)), str(a.get("trained_positions", 0)),
               str(a.get("stale_positions", 0)), str(a.get("rejected_positions", 0)),
               str(a.get("duplicate_positions", 0)), str(st["unsettled_positions"]),
               str(a.get("worker_discarded_positions", 0)), str(a.get("worker_lost_positions", 0)))
    parts = [wt, lt, at, _per_worker_table(st.get("per_worker") or {})]
    lost = {w: d for w, d in (st.get("per_worker") or {}).items() if d.get("worker_lost_positions")}
    if lost:  # the workers told these adds went in; the old primary never replicated them
        lt2 = Table(title="adds lost in failovers (acknowledged by the old primary, never replicated), per worker",
                    title_justify="left")
        for col in ("worker", "positions", "batches", "reason (the last)"):
            lt2.add_column(col, justify="left" if col in ("worker", "reason (the last)") else "right")
        for w, d in lost.items():
            lt2.add_row(w, str(d["worker_lost_positions"]), str(d.get("worker_lost_batches", 0)),
                        str(d.get("lost_reason", "")))
        parts.append(lt2)
    bn = st.get("bottleneck") if not stopped and st.get("control") != "stop" else None
    if bn:
        parts.append(Text(f"bottleneck: {bn['line']}" + (f" -> {bn['knob']}" if bn["limit"] in ("learner", "workers")
                                                           else ""), style="bold" if bn["limit"] in ("learner", "workers")
                          else ""))
    if ln.get("ranks"):
        parts.append(f"learner ranks: {ln['ranks']} (positions trained by each: {ln.get('rank_trained_positions', '-')})")
    if int(a.get("double_acks", 0) or 0):
        parts.append(f"entries trained by two learners (one stalled past claim_idle_ms), counted once: {a['double_acks']}")
    if sv.get("worker_restarts") or sv.get("learner_restarts") or sv.get("redis_restarts"):
        parts.append(f"restarted by keisei run after an unexpected exit: workers {sv.get('worker_restarts', 0)}, "
                     f"learner {sv.get('learner_restarts', 0)}, private Redis {sv.get('redis_restarts', 0)}")
    if ln.get("redis_outages") not in (None, "0"):
        parts.append(f"Redis outages seen by the learner: {ln.get('redis_outages')} "
                     f"({float(ln.get('redis_outage_s', 0)):.1f} s in all)")
    if st.get("losses"):
        ls = Table(title="data lost to Redis restarts and failovers (losses stream)", title_justify="left")
        for col in ("time", "kind", "detected by", "version", "unread positions lost", "held positions kept",
                    "new epoch"):
            ls.add_column(col, justify="right")
        for e in st["losses"]:  # a failover's entry (kind failover): the positions the new primary lacks
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e.get("time", 0) or 0)))
            ls.add_row(when, e.get("kind", "restart"), str(e.get("detected_by", "")),
                       str(e.get("version", e.get("version_held", ""))),
                       str(e.get("unread_positions_lost", e.get("produced_positions_missing", ""))),
                       str(e.get("held_positions_kept", "")), str(e.get("new_epoch", "")))
        parts.append(ls)
    if st.get("rating"):
        rt = Table(title="latest rating (random mover = 0)", title_justify="left")
        for k in st["rating"]:
            rt.add_column(str(k), justify="right")
        rt.add_row(*[str(v) for v in st["rating"].values()])
        parts.append(rt)
    return Group(*parts)


def _per_worker_table(pw: dict) -> Table:
    """Per worker: its credit and stream, its own accounting, and what its credential did to its own keys."""
    t = Table(title="per worker: credit, accounting, and what its credential did to its own keys", title_justify="left")
    for col in ("worker", "credit", "stream", "over credit", "produced", "trained", "stale", "rejected",
                "duplicate", "unsettled", "future ids", "stream resets", "unproven ends", "rep. lowered"):
        t.add_column(col, justify="left" if col == "worker" else "right")
    for w, d in pw.items():
        over = f"{d.get('overruns', 0)}x" + (f" (+{d.get('overrun_entries', 0)})" if d.get("overruns") else "")
        t.add_row(w + ("" if d.get("in_roster", True) else " (not read)"), str(d.get("credit", "-")),
                  str(d.get("stream_entries", "-")), over, *(str(d.get(k, 0)) for k in (
                      "produced_positions", "trained_positions", "stale_positions", "rejected_positions",
                      "duplicate_positions", "unsettled_positions", "future_ids", "stream_resets",
                      "unproven_endings", "repetition_clamped")))
    if not pw:
        t.add_row("(no workers on the roster)", *[""] * 13)
    return t


def saved_files(run_path: Path) -> dict:
    """What a run keeps in its directory after it stops (sizes in bytes; cheap: no archive is
    decompressed): ``checkpoint`` (newest ``ckpt_*.pt`` or None), ``checkpoints``,
    ``games_archive`` ``{dir, chunks, bytes}``, ``eval`` ``{dir, entries, versions}`` (counts from
    ``eval.jsonl`` and ``elo_table.json``, None when absent), ``tensorboard`` (dir or None)."""
    ckpts = sorted((run_path / "checkpoints").glob("ckpt_*.pt"))
    arch = run_path / "games"
    chunk_files = archive.chunks(arch)
    ev = run_path / "eval"
    entries = versions = None
    if (ev / EVAL_LOG).exists():
        with open(ev / EVAL_LOG, "rb") as fh:
            entries = sum(1 for line in fh if line.strip())
    if (ev / ELO_TABLE).exists():
        try:
            versions = len(saved_elo_table(ev))
        except (OSError, ValueError):
            versions = None
    tb = run_path / "tensorboard"
    return {"checkpoint": str(ckpts[-1]) if ckpts else None, "checkpoints": len(ckpts),
            "games_archive": {"dir": str(arch), "chunks": len(chunk_files),
                              "bytes": sum(p.stat().st_size for p in chunk_files)},
            "eval": {"dir": str(ev), "entries": entries, "versions": versions},
            "tensorboard": str(tb) if tb.is_dir() else None}


def saved_status(run_path: Path) -> Optional[dict]:
    """The final status a stopped local run saved (``final_status.json``, written by ``keisei run``
    at its end), with ``stopped: True``, ``stopped_at`` (local time, ISO 8601, from the file's
    modification time), ``stopped_at_unix``, ``stopped_ago_s``, ``saved_status`` (the file) and
    ``files`` (:func:`saved_files`); the newest saved rating (``eval/elo_table.json``) fills
    ``rating`` when the file has none. None when there is no such file.

    Raises:
        ValueError: the file is not JSON.
    """
    path = run_path / FINAL_STATUS
    if not path.exists():
        return None
    st = json.loads(path.read_text())
    mtime = path.stat().st_mtime
    st.update({"stopped": True,
               "stopped_at": datetime.datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds"),
               "stopped_at_unix": round(mtime, 3), "stopped_ago_s": round(time.time() - mtime),
               "saved_status": str(path), "files": saved_files(run_path)})
    if st.get("rating"):
        try:  # seconds since the evaluation, counted until now rather than until the stop
            st["rating"]["age_s"] = round(float(st["rating"]["age_s"]) + st["stopped_ago_s"])
        except (KeyError, TypeError, ValueError):
            pass
    else:
        try:
            st["rating"] = saved_latest_rating(run_path / "eval")
        except (OSError, ValueError, KeyError, TypeError):
            st["rating"] = None
    return st


def _ago(seconds: float) -> str:
    s = int(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def render_stopped(st: dict) -> Group:
    """:func:`render_status` of a saved final status under a line saying that the run is stopped,
    since when, and what it left on disk."""
    f = st["files"]
    arch, ev = f["games_archive"], f["eval"]
    lines = [f"[bold]run {st['run']} is stopped[/bold] (stopped at {st['stopped_at']}, {_ago(st['stopped_ago_s'])} ago; "
             f"its Redis is gone): final status from {st['saved_status']}",
             f"checkpoint: {f['checkpoint'] or '-'} ({f['checkpoints']} kept)",
             f"games archive: {arch['dir']} ({arch['chunks']} chunk(s), {arch['bytes']} bytes)"
             f" - keisei games list|show|export --run {st['run']} read it",
             "evaluation: " + (f"{ev['dir']} ({ev['entries'] or 0} match entries, {ev['versions'] or 0} versions)"
                                f" - keisei eval --table --run {st['run']} reads it"
                                if ev["entries"] is not None or ev["versions"] is not None else "none saved")]
    if f["tensorboard"]:
        lines.append(f"tensorboard: tensorboard --logdir {f['tensorboard']}")
    return Group(*[Text.from_markup(x) if i == 0 else Text(x) for i, x in enumerate(lines)],
                 render_status(st, stopped=True))


def command(args: argparse.Namespace) -> int:
    """``keisei status``: returns 0, 1 when neither the run's Redis nor its saved final status is
    there (Ctrl-C ends ``--watch``)."""
    console = make_console()
    rr = find_redis(args)
    if rr.client is None:
        try:
            st = saved_status(run_dir(args))
        except ValueError as exc:
            st, why = None, f"{run_dir(args) / FINAL_STATUS} is not readable JSON ({exc})"
        else:
            why = f"no saved final status at {run_dir(args) / FINAL_STATUS}"
        if st is None:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {rr.why}, and {why}", highlight=False)
            return 1
        if args.json:
            print(json.dumps(st, default=str, indent=2))
        else:
            console.print(render_stopped(st))
        return 0
    r = rr.client
    if args.json:
        print(json.dumps({"stopped": False, **collect_status(r, args.run)}, default=str, indent=2))
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
