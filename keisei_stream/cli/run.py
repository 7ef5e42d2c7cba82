"""``keisei run``: a whole local run in one command: a private, persistent Redis with least-privilege
users (unless ``--redis``), the learner and N workers as supervised child processes
(``python -m learner`` as the run's ``learner`` user, ``python -m workers`` each as its own worker
user; with ``--eval`` also ``keisei eval --follow`` as the ``evaluator`` user; logs in
``{run.dir}/{run.id}/logs``), a live status view, and a clean stop.

:func:`command` reads as its steps; the supervision itself is :mod:`keisei_stream.ops.supervise`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.live import Live

from keisei_stream.cli.common import make_console, url_file
from keisei_stream.cli.status import FINAL_STATUS, collect_status, render_status
from keisei_stream.config import Config, ConfigError, load_config
from keisei_stream.ops import compat, embedded_redis, local, supervise
from keisei_stream.wire import client, status
from keisei_stream.wire.keys import Keys


def command(args: argparse.Namespace) -> int:
    """``keisei run``: start the run, supervise it until ``--duration``, Ctrl-C, SIGTERM or the
    learner's exit for good, then stop it in order (workers, then the learner).

    Returns:
        0 when the learner exited cleanly, 1 when it did not, 2 for a bad config (the file, or a
        child that stopped on a configuration error such as a device torch cannot use: the run
        stops at once with its message) or an unsupported Redis.
    """
    console = make_console()
    cfg = load_run_config(args, console)
    if cfg is None:
        return 2
    run_id, run_dir = cfg.run.id, Path(cfg.run.dir) / cfg.run.id
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    gpus = local.gpu_count()
    worker_ids = [f"w{i}" for i in range(n_workers(args, gpus))]
    devices = dict(zip(worker_ids, local.worker_devices(cfg.worker.device, len(worker_ids), gpus)))
    try:
        rr = start_redis_and_users(args, cfg, run_dir, worker_ids, console)
    except (compat.UnsupportedServer, embedded_redis.RedisStartError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    url_file(run_dir).write_text(rr.url + "\n")
    r = supervise.supervisor_client(rr.url)
    admin = client.connect(rr.url)  # waits Redis out, unlike the supervisor's bounded client
    keys = Keys(run_id)
    learner_state = None
    try:
        status.set_control(admin, keys, "run")  # also on a full Redis (--resume)
        sup = make_supervisor(args, rr, r, keys, run_dir, devices, console)
        console.print(f"keisei run [bold]{run_id}[/bold]: {rr.info.describe()} at {rr.url}, {args.learners} learner(s) + "
                      f"{len(worker_ids)} workers" + (" + the evaluator" if args.eval else "")
                      + (f" (forward passes on {gpus} GPU(s))" if any(devices.values()) else "")
                      + f", logs in {run_dir / 'logs'}"
                      + (f", for {args.duration:.0f} s" if args.duration else ", Ctrl-C stops"),
                      soft_wrap=True)  # one line in a log, however long the Redis URL
        sup.start()
        with stop_signals_interrupt():
            why = watch_with_view(args, sup, r, run_id, console)
        with stop_signals_noted(console):
            console.print(f"stopping ({why}): workers first (control=stop), then the learner drains, updates and "
                          "checkpoints")
            supervise.stop_in_order(sup, args.learner_stop_timeout)
            learner_state = final_status(admin, run_id, run_dir, console)
    finally:  # whatever happened, the private Redis does not outlive the run
        with stop_signals_noted(console):
            admin.close()
            if rr.stop():
                console.print("the private Redis did not stop on SIGTERM in time (busy running a script?): killed")
            if rr.server is not None:
                url_file(run_dir).unlink(missing_ok=True)
    report_checkpoint(run_dir, console)
    # torchrun exits 1 when it is stopped by a signal, even after its ranks stopped cleanly: rank 0
    # then wrote the learner state "stopped"
    if sup.fatal:
        console.print(f"[red]error:[/red] {sup.fatal}", highlight=False)
        return 2
    code = sup.learner.returncode
    return 0 if code == 0 or (args.learners > 1 and learner_state == "stopped") else 1


def load_run_config(args: argparse.Namespace, console) -> Config | None:
    """The config with ``--set`` overrides and ``--run``; None (after printing why) when invalid."""
    try:
        cfg = load_config(args.config, args.overrides)
        if args.run:
            cfg.run.id = args.run
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return None
    return cfg


def n_workers(args: argparse.Namespace, gpus: int = 0) -> int:
    """``--workers``; by default the cores left after the learner (at least 1), and on a machine
    with GPUs one core fewer: the workers' forward passes run on the GPUs, each worker process
    steps its boards on one core, and the learner's main thread decodes the next entries while
    its training thread drives the GPU."""
    if args.workers is not None:
        return args.workers
    return max(1, (os.cpu_count() or 2) - (2 if gpus else 1))


def start_redis_and_users(args: argparse.Namespace, cfg: Config, run_dir: Path, worker_ids: list[str],
                          console) -> local.RunRedis:
    """The private Redis with the run's users and roster and the request-size limits of ``cfg``
    (:func:`keisei_stream.ops.local.start_private_redis`, :func:`~keisei_stream.ops.local.request_limit`),
    or the ``--redis`` server with the workers on its roster; either checked for a supported version.

    Raises:
        compat.UnsupportedServer: the server is older than Redis 6.2.
        embedded_redis.RedisStartError: the private server did not start.
    """
    if args.redis:
        return local.use_redis(args.redis, cfg.run.id, worker_ids)
    return local.start_private_redis(run_dir, cfg.run.id, worker_ids, resume=args.resume, maxmemory=args.maxmemory,
                                     appendfsync=args.appendfsync, say=console.print,
                                     max_request_bytes=local.request_limit(cfg))


def make_supervisor(args: argparse.Namespace, rr: local.RunRedis, r, keys: Keys, run_dir: Path,
                    devices: dict[str, str | None], console) -> supervise.Supervisor:
    """The learner and worker children (not started yet; ``devices``: worker id -> its
    ``--device`` or None); their Redis URLs (with the passwords) go in the environment variable
    ``KEISEI_REDIS``, not on command lines where ``ps`` shows them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = run_dir / "logs"
    cmd = learner_command(args, keys.run)
    resume_cmd = cmd if args.resume else learner_command(argparse.Namespace(**{**vars(args), "resume": True}), keys.run)
    learner = supervise.Child("learner", cmd, {**env, client.URL_ENV: rr.url_for("learner")}, logs / "learner.out",
                              resume_cmd=resume_cmd)
    workers = [supervise.Child(wid, worker_command(args, keys.run, wid, device),
                               {**env, client.URL_ENV: rr.url_for(f"worker:{wid}")}, logs / f"worker-{wid}.out")
               for wid, device in devices.items()]
    evaluator = None
    if args.eval:
        evaluator = supervise.Child("evaluator", evaluator_command(keys.run, run_dir.parent),
                                    {**env, client.URL_ENV: rr.url_for("evaluator")}, logs / "evaluator.out")
    return supervise.Supervisor(r, keys, learner, workers, redis=rr, evaluator=evaluator,
                                backoff=supervise.Backoff(base_s=args.restart_backoff),
                                learner_restarts=args.learner_restarts if args.learners == 1 else 0,
                                say=lambda line: console.print(line, highlight=False))


def worker_command(args: argparse.Namespace, run_id: str, worker_id: str, device: str | None = None) -> list[str]:
    """``python -m workers --run RUN --id ID [--games N] [--device D]`` (the URL: ``KEISEI_REDIS``)."""
    cmd = [sys.executable, "-m", "workers", "--run", run_id, "--id", worker_id]
    return cmd + (["--games", str(args.games)] if args.games else []) + (["--device", device] if device else [])


def evaluator_command(run_id: str, runs_dir: Path) -> list[str]:
    """``keisei eval --follow --run RUN --runs-dir DIR`` (``keisei run --eval``): every
    ``eval.every_versions``-th version against ``eval.opponents``, into the ``eval`` stream, the
    ``elo`` hash and ``DIR/RUN/eval/`` (the URL: ``KEISEI_REDIS``, the run's ``evaluator`` user)."""
    return [sys.executable, "-m", "keisei_stream.cli", "eval", "--follow", "--run", run_id,
            "--runs-dir", str(runs_dir), "--no-progress"]


@contextmanager
def _on_stop_signals(handler) -> Iterator[None]:
    """SIGTERM and SIGINT go to ``handler`` (SIGINT set explicitly: a shell starts background jobs
    with SIGINT ignored); the previous handlers are restored afterwards."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT both raise ``KeyboardInterrupt`` ("stop the run in order")."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    with _on_stop_signals(interrupt):
        yield


@contextmanager
def stop_signals_noted(console) -> Iterator[None]:
    """While the run stops in order: SIGTERM and SIGINT only print that it is stopping (a second
    Ctrl-C must not leave the private Redis or the children half stopped)."""
    def note(signum, frame):
        console.print("already stopping in order (the private Redis goes with this process in any case)")

    with _on_stop_signals(note):
        yield


def watch_with_view(args: argparse.Namespace, sup: supervise.Supervisor, r, run_id: str, console) -> str:
    """:func:`keisei_stream.ops.supervise.watch` with the live status table, or with a status
    line every ``--print-every`` seconds (``--no-live`` or no terminal); returns why it ended."""
    if args.no_live or not console.is_terminal:
        last = [-1e9]
        t0 = [None]

        def line() -> None:
            now = time.monotonic()
            t0[0] = t0[0] or now
            if now - last[0] < args.print_every:
                return
            last[0] = now
            st = collect_status(r, run_id)
            ln, acc = st["learner"], st["accounting"]
            console.print(f"[{now - t0[0]:7.0f}s] version {ln.get('version', '-')} updates {ln.get('updates', '-')} "
                          f"backlog {st['stream'].get('backlog', '-')} produced {acc.get('produced_positions', 0)} "
                          f"trained {acc.get('trained_positions', 0)} worker restarts {sup.worker_restarts()}",
                          highlight=False)
        return supervise.watch(sup, args.duration, line)
    with Live("starting...", console=console, refresh_per_second=1) as live:
        return supervise.watch(sup, args.duration, lambda: live.update(render_status(collect_status(r, run_id))))


def final_status(r, run_id: str, run_dir: Path, console) -> str | None:
    """Print the final status table and save it as ``final_status.json`` (with the positions of
    the entries left in the streams, ``stream.positions``, and per worker ``in_stream_positions``);
    returns the learner's last state (None when Redis does not answer or is busy)."""
    try:
        st = collect_status(r, run_id)
        # after the drain the streams are short: the positions of what is left (read once, here)
        for w, d in st["per_worker"].items():
            d["in_stream_positions"] = status.stream_positions(r, Keys(run_id), w)
        st["stream"]["positions"] = sum(d["in_stream_positions"] for d in st["per_worker"].values())
        console.print(render_status(st))
        (run_dir / FINAL_STATUS).write_text(json.dumps(st, default=str, indent=2))
        return st["learner"].get("state")
    except Exception as exc:  # noqa: BLE001 - the run is over either way; say why there is no table
        console.print(f"[yellow]final status unavailable: {exc}[/yellow]")
        return None


def report_checkpoint(run_dir: Path, console) -> None:
    """Print the newest checkpoint's path (torch is imported only here: the supervisor needs it,
    about 2 s to import, for nothing but this file name)."""
    from keisei_stream.rl.checkpoint import latest_checkpoint

    console.print(f"checkpoint: {latest_checkpoint(run_dir / 'checkpoints')}")


def learner_command(args: argparse.Namespace, run_id: str) -> list[str]:
    """``python -m learner ...``, or with ``--learners N > 1`` the same under torchrun: N ranks on
    this machine (``--standalone``), restarted together up to ``--learner-restarts`` times when
    one fails (they resume from the newest checkpoint), given ``--learner-stop-timeout`` seconds
    to stop cleanly on SIGTERM. The Redis URL is not on the command line (it holds a password):
    ``keisei run`` passes it in the environment variable ``KEISEI_REDIS``."""
    py = sys.executable
    cmd = [py, "-m", "learner"]
    if args.learners > 1:
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.learners),
               "--max-restarts", str(args.learner_restarts), "--shutdown-timeout", str(int(args.learner_stop_timeout)),
               "-m", "learner"]
    # the run id as an override: torchrun's parser would take "--run" for its own "--run-path"
    cmd += ["--config", str(args.config), "--set", f"run.id={run_id}"]  # the URL: KEISEI_REDIS, see command()
    for ov in args.overrides:
        cmd += ["--set", ov]
    if args.resume:
        cmd.append("--resume")
    return cmd
