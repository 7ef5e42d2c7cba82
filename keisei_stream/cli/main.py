"""The ``keisei`` command: ``run``, ``status``, ``eval``, ``usi``, ``games``.

``keisei run`` starts a whole local run (private Redis unless ``--redis``, the learner, N workers)
with a live status view and a clean stop on Ctrl-C or at ``--duration``. ``keisei status`` shows
one table from Redis: workers, learner, stream, position accounting, latest rating.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from keisei_stream.config import ConfigError, load_config

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"90"`` -> seconds (float).

    Raises:
        argparse.ArgumentTypeError: on anything else.
    """
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 30m, 1h30m, 90s)")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mnt * 60 + s


def url_file(run_dir: Path) -> Path:
    """Where ``keisei run`` records the Redis URL of a local run (so ``keisei status`` finds it)."""
    return run_dir / "redis.url"


def resolve_redis(args) -> str:
    """The ``--redis`` URL, else the one recorded by a local ``keisei run`` of ``--run``."""
    if getattr(args, "redis", None):
        return args.redis
    f = url_file(Path(args.runs_dir) / args.run)
    if f.exists():
        return f.read_text().strip()
    raise SystemExit(f"error: no --redis given and no local run found at {f}")


# --------------------------------------------------------------------------------------------
# status


def collect_status(r, run_id: str) -> dict:
    """Everything ``keisei status`` shows, as plain data (also printed by ``--json``)."""
    from keisei_stream.wire import status
    from keisei_stream.wire.keys import Keys

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
    rating = None
    try:
        from keisei_stream.play.evaluation import latest_rating

        rating = latest_rating(r, run_id)
    except Exception:  # evaluation may not have run; status must still show
        rating = None
    produced = acc.get("produced_positions", 0)
    settled = (acc.get("trained_positions", 0) + acc.get("stale_positions", 0)
               + acc.get("rejected_positions", 0) + acc.get("duplicate_positions", 0))
    return {"run": run_id, "control": control, "workers": workers, "learner": learner,
            "stream": stream, "accounting": acc, "settled_positions": settled,
            "unsettled_positions": produced - settled, "rating": rating}


def render_status(st: dict):
    """A rich renderable (tables) of :func:`collect_status`'s data."""
    from rich.console import Group
    from rich.table import Table

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


def _console():
    """A rich console; 160 columns wide when the output is a file or pipe (logs stay readable)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def cmd_status(args) -> int:
    from rich.live import Live

    from keisei_stream.wire.embedded_redis import connect

    r = connect(resolve_redis(args))
    console = _console()
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


# --------------------------------------------------------------------------------------------
# run


def _child_preexec() -> None:  # pragma: no cover - runs in the child
    """New session (a terminal's Ctrl-C reaches only ``keisei run``, which stops the children in
    order), and SIGTERM to the child if ``keisei run`` dies (Linux PR_SET_PDEATHSIG)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _terminate(procs: list[subprocess.Popen], sig: int, timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def cmd_run(args) -> int:
    from rich.live import Live

    from keisei_stream.wire import status
    from keisei_stream.wire.embedded_redis import connect, start_redis
    from keisei_stream.wire.keys import Keys

    console = _console()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.run:
            cfg.run.id = args.run
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    run_id = cfg.run.id
    run_dir = Path(cfg.run.dir) / run_id
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n_workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)

    server = None
    if args.redis:
        url = args.redis
    else:
        server = start_redis(run_dir)
        url = server.url
    url_file(run_dir).write_text(url + "\n")
    r = connect(url)
    keys = Keys(run_id)
    status.set_control(r, keys, "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    py = sys.executable
    learner_cmd = [py, "-m", "learner", "--config", str(args.config), "--redis", url, "--run", run_id]
    for ov in args.overrides:
        learner_cmd += ["--set", ov]
    if args.resume:
        learner_cmd.append("--resume")
    console.print(f"keisei run [bold]{run_id}[/bold]: Redis {url}, 1 learner + {n_workers} workers, "
                  f"logs in {logs}" + (f", for {args.duration:.0f} s" if args.duration else ", Ctrl-C stops"))
    learner = subprocess.Popen(learner_cmd, stdout=open(logs / "learner.out", "ab"),
                               stderr=subprocess.STDOUT, env=env, preexec_fn=_child_preexec)
    workers = []
    for i in range(n_workers):
        cmd = [py, "-m", "workers", "--redis", url, "--run", run_id, "--id", f"w{i}"]
        if args.games:
            cmd += ["--games", str(args.games)]
        workers.append(subprocess.Popen(cmd, stdout=open(logs / f"worker-w{i}.out", "ab"),
                                        stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_child_preexec))
    t0 = time.monotonic()
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM and SIGINT both mean "stop the run in order" (SIGINT is set explicitly: a shell
    # starts background jobs with SIGINT ignored).
    old_term = signal.signal(signal.SIGTERM, interrupt)
    old_int = signal.signal(signal.SIGINT, interrupt)
    try:
        def loop(update):
            while True:
                if args.duration and time.monotonic() - t0 >= args.duration:
                    return
                if learner.poll() is not None:
                    console.print(f"[red]learner exited with {learner.returncode}[/red]; see {logs / 'learner.out'}")
                    return
                time.sleep(2.0)
                update()

        if args.no_live or not console.is_terminal:
            def update():
                st = collect_status(r, run_id)
                ln = st["learner"]
                console.print(f"[{time.monotonic() - t0:7.0f}s] version {ln.get('version', '-')} "
                              f"updates {ln.get('updates', '-')} backlog {st['stream'].get('backlog', '-')} "
                              f"produced {st['accounting'].get('produced_positions', 0)} "
                              f"trained {st['accounting'].get('trained_positions', 0)}", highlight=False)
                time.sleep(max(0.0, args.print_every - 2.0))
            loop(update)
        else:
            with Live(render_status(collect_status(r, run_id)), console=console, refresh_per_second=1) as live:
                loop(lambda: live.update(render_status(collect_status(r, run_id))))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        console.print("stopping: workers first (control=stop), then the learner drains, updates and checkpoints")
        try:
            status.set_control(r, keys, "stop")
        except Exception as exc:  # Redis gone: signals still stop everything
            console.print(f"[yellow]could not set control=stop: {exc}[/yellow]")
        deadline = time.monotonic() + 30.0
        for p in workers:  # a worker stops at its next step; SIGTERM, then SIGKILL, if it does not
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _terminate([p], signal.SIGTERM, 10.0)
                if p.poll() is None:
                    p.kill()
        _terminate([learner], signal.SIGTERM, args.learner_stop_timeout)
        if learner.poll() is None:
            console.print("[red]learner did not stop in time; killed[/red]")
            learner.kill()
            learner.wait()
        try:
            st = collect_status(r, run_id)
            console.print(render_status(st))
            (run_dir / "final_status.json").write_text(json.dumps(st, default=str, indent=2))
        except Exception as exc:
            console.print(f"[yellow]final status unavailable: {exc}[/yellow]")
        if server is not None:
            server.stop()
            url_file(run_dir).unlink(missing_ok=True)
    from keisei_stream.rl.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    console.print(f"checkpoint: {ckpt}")
    return 0 if learner.returncode == 0 else 1


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keisei", description="keisei-stream: distributed self-play RL for Shogi")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("run", help="start a whole local run: private Redis, learner, workers")
    pr.add_argument("--config", required=True, help="YAML run configuration")
    pr.add_argument("--workers", type=int, default=None, help="worker processes (default: cores - 1)")
    pr.add_argument("--games", type=int, default=None, help="games per worker (default: config worker.games)")
    pr.add_argument("--duration", type=parse_duration, default=None, help="stop after this long (30m, 1h, 90s)")
    pr.add_argument("--redis", default=None, help="use this Redis instead of a private one")
    pr.add_argument("--run", default=None, help="run id (default: config run.id)")
    pr.add_argument("--resume", action="store_true", help="the learner continues from the newest checkpoint")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pr.add_argument("--no-live", action="store_true", help="print a status line instead of the live view")
    pr.add_argument("--print-every", type=float, default=30.0, help="seconds between status lines (--no-live)")
    pr.add_argument("--learner-stop-timeout", type=float, default=300.0)
    pr.set_defaults(func=cmd_run)

    ps = sub.add_parser("status", help="workers, learner, stream and accounting of a run")
    ps.add_argument("--redis", default=None, help="Redis URL (default: the one of a local `keisei run`)")
    ps.add_argument("--run", default="quickstart", help="run id")
    ps.add_argument("--runs-dir", default="runs")
    ps.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    ps.add_argument("--interval", type=float, default=2.0)
    ps.add_argument("--json", action="store_true", help="print the data as JSON")
    ps.set_defaults(func=cmd_status)

    try:
        from keisei_stream.play import evaluation, records, usi

        pe = sub.add_parser("eval", help="play a match and report score and Elo")
        evaluation.add_eval_arguments(pe)
        pe.set_defaults(func=evaluation.cli_eval)
        pu = sub.add_parser("usi", help="the trained policy as a USI engine on stdin/stdout")
        usi.add_usi_arguments(pu)
        pu.set_defaults(func=usi.main)
        pg = sub.add_parser("games", help="export or show recorded games")
        records.add_games_arguments(pg)
        pg.set_defaults(func=records.cli_games)
    except ImportError:  # pragma: no cover - evaluation modules are part of the package
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keisei`` console script."""
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
