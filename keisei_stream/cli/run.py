"""``keisei run``: a whole local run in one command: a private, persistent Redis with least-privilege
users (unless ``--redis``), the learner and N workers as child processes (``python -m learner`` as
the run's ``learner`` user, ``python -m workers`` as its ``worker`` user; logs in
``{run.dir}/{run.id}/logs``), a live status view, and a clean stop."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.live import Live

from keisei_stream.cli.common import make_console, url_file
from keisei_stream.cli.status import collect_status, render_status
from keisei_stream.config import ConfigError, load_config
from keisei_stream.ops import acl, embedded_redis
from keisei_stream.wire import client, status
from keisei_stream.wire.keys import Keys


def _child_preexec() -> None:  # pragma: no cover - runs in the child
    """New session (a terminal's Ctrl-C reaches only ``keisei run``, which stops the children in
    order), and SIGTERM to the child if ``keisei run`` dies (Linux PR_SET_PDEATHSIG)."""
    os.setsid()
    try:
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


def start_private_redis(run_dir: Path, run_id: str, args: argparse.Namespace, console) -> tuple:
    """The run's private Redis: persistent (append-only file in ``run_dir/appendonlydir`` with
    ``args.appendfsync``), with one ACL user per role (:mod:`keisei_stream.ops.acl`; passwords in
    ``run_dir/redis-users.json``, mode 600). A run started without ``--resume`` begins from an empty
    server (the previous append-only file is removed); with ``--resume`` the server loads it, so
    the stream, its pending entries and the accounting are back.

    Returns:
        ``(server, admin_url, learner_url, worker_url)``.
    """
    aof = run_dir / "appendonlydir"
    if aof.exists() and not args.resume:
        console.print(f"starting fresh: removing the previous run's Redis data in {aof} (--resume continues it)")
        shutil.rmtree(aof)
    server = embedded_redis.start_redis(run_dir, maxmemory=args.maxmemory, appendonly=True,
                                        appendfsync=args.appendfsync)
    admin = client.connect(server.url)
    passwords = acl.create_users(admin, run_id)
    admin.close()
    users = run_dir / "redis-users.json"
    users.touch(mode=0o600)
    users.write_text(json.dumps({acl.username(run_id, role): pw for role, pw in passwords.items()}, indent=2))
    learner_url = acl.user_url(server.url, acl.username(run_id, "learner"), passwords["learner"])
    worker_url = acl.user_url(server.url, acl.username(run_id, "worker"), passwords["worker"])
    return server, server.url, learner_url, worker_url


def command(args: argparse.Namespace) -> int:
    """``keisei run``: start the run, show its status until ``--duration``, Ctrl-C, SIGTERM or
    the learner's exit, then stop it in order (workers, then the learner).

    Returns:
        0 when the learner exited cleanly, 1 when it did not, 2 for a bad config.
    """
    console = make_console()
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
    learner_url = worker_url = url = args.redis
    if not args.redis:
        server, url, learner_url, worker_url = start_private_redis(run_dir, run_id, args, console)
    url_file(run_dir).write_text(url + "\n")
    r = client.connect(url)
    keys = Keys(run_id)
    status.set_control(r, keys, "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    py = sys.executable
    learner_cmd = learner_command(args, run_id)
    console.print(f"keisei run [bold]{run_id}[/bold]: Redis {url}, {args.learners} learner(s) + {n_workers} workers, "
                  f"logs in {logs}" + (f", for {args.duration:.0f} s" if args.duration else ", Ctrl-C stops"))
    learner = subprocess.Popen(learner_cmd, stdout=open(logs / "learner.out", "ab"), stderr=subprocess.STDOUT,
                               env=dict(env, KEISEI_REDIS=learner_url), preexec_fn=_child_preexec)
    workers = []
    for i in range(n_workers):
        cmd = [py, "-m", "workers", "--run", run_id, "--id", f"w{i}"]  # the URL (a password) in the environment
        if args.games:
            cmd += ["--games", str(args.games)]
        workers.append(subprocess.Popen(cmd, stdout=open(logs / f"worker-w{i}.out", "ab"),
                                        stderr=subprocess.STDOUT, env=dict(env, KEISEI_REDIS=worker_url),
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
            last_print = [-1e9]

            def update():  # a line every --print-every seconds; the loop checks the duration every 2 s
                if time.monotonic() - last_print[0] < args.print_every:
                    return
                last_print[0] = time.monotonic()
                st = collect_status(r, run_id)
                ln = st["learner"]
                console.print(f"[{time.monotonic() - t0:7.0f}s] version {ln.get('version', '-')} "
                              f"updates {ln.get('updates', '-')} backlog {st['stream'].get('backlog', '-')} "
                              f"produced {st['accounting'].get('produced_positions', 0)} "
                              f"trained {st['accounting'].get('trained_positions', 0)}", highlight=False)
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
        learner_state = _learner_state(url, run_id)
        if server is not None:
            server.stop()
            url_file(run_dir).unlink(missing_ok=True)
    # imported only now: the supervisor needs torch (about 2 s to import) for nothing but this
    # file name, so the run starts without it
    from keisei_stream.rl.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    console.print(f"checkpoint: {ckpt}")
    # torchrun exits 1 when it is stopped by a signal, even after its ranks stopped cleanly: rank 0
    # then wrote the learner state "stopped"
    clean = learner.returncode == 0 or (args.learners > 1 and learner_state == "stopped")
    return 0 if clean else 1


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


def _learner_state(url: str, run_id: str) -> str | None:
    try:
        return status.read_learner_status(client.connect(url), Keys(run_id)).get("state")
    except Exception:  # the Redis is gone: the state is unknown
        return None


