"""The ``keisei`` command: the argument parser of every sub-command and the dispatch to its module.

- ``keisei run`` (:mod:`keisei_stream.cli.run`): a whole local run (private Redis unless
  ``--redis``, the learner, N workers) with a live status view and a clean stop on Ctrl-C or at
  ``--duration``;
- ``keisei status`` (:mod:`keisei_stream.cli.status`): one table from Redis: workers, learner,
  stream, position accounting, latest rating; a stopped run's saved final status;
- ``keisei eval`` (:mod:`keisei_stream.cli.eval`): a match, the Elo table, or ``--follow`` a run;
- ``keisei usi`` (:mod:`keisei_stream.cli.usi`): the policy as a USI engine on stdin/stdout;
- ``keisei games`` (:mod:`keisei_stream.cli.games`): export, show or list recorded games (from
  the ``games`` stream and the run's archive on disk);
- ``keisei users`` (:mod:`keisei_stream.cli.users`): the run's least-privilege Redis users;
- ``keisei relay`` (:mod:`keisei_stream.cli.relay`): a host's read-only copy of a run for its workers;
- ``keisei plot`` (:mod:`keisei_stream.cli.plot`): a run's learning curve and Elo over versions.

Each command module has ``command(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re

#: ``keisei games export --format`` choices: the keys of ``keisei_stream.play.records.FORMATS``
#: (tests/test_records.py checks that they agree), restated so that building the parser imports
#: no play module
EXPORT_FORMATS = ("csa", "kif", "usi")

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


def build_parser() -> argparse.ArgumentParser:
    """The ``keisei`` parser; ``args.command`` names the sub-command (and its module)."""
    p = argparse.ArgumentParser(prog="keisei", description="keisei-stream: distributed self-play RL for Shogi")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("run", help="start a whole local run: private Redis, learner, workers")
    pr.add_argument("--config", required=True, help="YAML run configuration")
    pr.add_argument("--workers", type=int, default=None, help="worker processes (default: cores - 1)")
    pr.add_argument("--games", type=int, default=None, help="games per worker (default: config worker.games)")
    pr.add_argument("--duration", type=parse_duration, default=None, help="stop after this long (30m, 1h, 90s)")
    pr.add_argument("--redis", default=None, help="use this Redis instead of a private one")
    pr.add_argument("--run", default=None, help="run id (default: config run.id)")
    pr.add_argument("--eval", action="store_true",
                    help="also run the continuous evaluation (keisei eval --follow: every eval.every_versions-th "
                         "version against eval.opponents, one process, one thread), for the Elo over versions "
                         "that keisei plot draws")
    pr.add_argument("--resume", action="store_true",
                    help="continue the run: the learner from its newest checkpoint, the private Redis from its "
                         "append-only file (the entries still in the stream are trained)")
    pr.add_argument("--appendfsync", choices=("always", "everysec", "no"), default="everysec",
                    help="fsync policy of the private Redis's append-only file (docs: reliability, persistence)")
    pr.add_argument("--maxmemory", default="1gb",
                    help="maxmemory of the private Redis (docs: reliability, sizing maxmemory)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pr.add_argument("--no-live", action="store_true", help="print a status line instead of the live view")
    pr.add_argument("--print-every", type=float, default=30.0, help="seconds between status lines (--no-live)")
    pr.add_argument("--learner-stop-timeout", type=float, default=300.0,
                    help="seconds the learner has to drain, update and checkpoint at the stop")
    pr.add_argument("--learners", type=int, default=1,
                    help="data-parallel learner ranks (torch.distributed; > 1 starts them with torchrun)")
    pr.add_argument("--learner-restarts", type=int, default=3,
                    help="times a learner that exits with an error is restarted with --resume (with --learners > 1: "
                         "torchrun's --max-restarts of the ranks)")
    pr.add_argument("--restart-backoff", type=float, default=1.0,
                    help="seconds before a crashed worker (or learner) is restarted; doubles with each crash that "
                         "comes within a minute of its start, up to 30 s")

    ps = sub.add_parser("status", help="workers, learner, stream and accounting of a run",
                        description="The live status from the run's Redis; when that does not answer (a "
                        "finished local run), the final status `keisei run` saved, marked stopped with its time.")
    ps.add_argument("--redis", default=None, help="Redis URL (default: the one of a local `keisei run`)")
    ps.add_argument("--run", default="quickstart", help="run id")
    ps.add_argument("--runs-dir", default="runs", help="the runs directory (default runs): a local run's "
                    "Redis URL, and the final status RUNS_DIR/RUN/final_status.json shown once the run has stopped")
    ps.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    ps.add_argument("--interval", type=float, default=2.0)
    ps.add_argument("--json", action="store_true", help="print the data as JSON")

    pe = sub.add_parser(
        "eval", help="play a match and report score and Elo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Play a match between two players and report score and Elo (95 %% interval).",
        epilog="""player specs (options after ';'):
  random | greedy
  checkpoint:PATH[;temperature=T][;device=D][;name=N]       the raw policy: one forward pass a move
  redis:URL#RUN@VERSION|latest|sha256:HEX[;temperature=T]    a run's weights version, raw policy
  search:PATH[;nodes=N][;batch_size=B][;time_limit=S]...     PUCT tree search, N simulations a move
                                                             (default 800; any MCTS keyword)
  redis:URL#RUN@VERSION;nodes=N[;...]                        that version with tree search
  checkpoint:PATH;nodes=N                                    same as search:PATH;nodes=N
  usi:CMD[;go=go byoyomi 1000][;option.K=V][;timeout=S]      an external USI engine

examples:
  raw policy against its own search (both strengths of one checkpoint):
    keisei eval --player "search:runs/quickstart/checkpoints/ckpt_00000100.pt;nodes=800" \\
      --opponent checkpoint:runs/quickstart/checkpoints/ckpt_00000100.pt --games 100 --opening-plies 8
  a Redis version with search against the same version's raw policy:
    keisei eval --player "redis:redis://host:6379/0#quickstart@120;nodes=200" \\
      --opponent "redis:redis://host:6379/0#quickstart@120" --games 100 --processes 2""")
    pe.add_argument("--checkpoint", default=None, help="player A is this checkpoint (same as --player checkpoint:FILE)")
    pe.add_argument("--player", default=None, help="player A spec (below): random | greedy | checkpoint:PATH | "
                    "redis:URL#RUN@VERSION|latest | search:PATH;nodes=N | redis:...;nodes=N | "
                    "usi:CMD;go=...;option.K=V;timeout=S")
    pe.add_argument("--opponent", default="random", help="player B spec (default: random)")
    pe.add_argument("--games", type=int, default=None, help="games (default 100; --follow: config eval.games)")
    pe.add_argument("--opening-plies", type=int, default=None, help="random opening plies (same for both colours)")
    pe.add_argument("--processes", type=int, default=None, help="worker processes (default 1)")
    pe.add_argument("--max-plies", type=int, default=None,
                    help="draw after this many plies (default: the checkpoint's env.max_plies, else 256)")
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--temperature", type=float, default=None, help="model players: 0 = argmax (default)")
    pe.add_argument("--device", default="cpu", help="model players: cpu | cuda | auto")
    pe.add_argument("--json", default=None, metavar="OUT", help="write the result (with every game) as JSON")
    pe.add_argument("--no-progress", action="store_true", help="no progress bar")
    pe.add_argument("--follow", action="store_true", help="continuously evaluate a run's weights versions")
    pe.add_argument("--table", action="store_true", help="print the run's Elo-over-versions table and exit "
                    "(from Redis, else from the table --follow saved in RUNS_DIR/RUN/eval)")
    pe.add_argument("--run", default="quickstart", help="run id (--follow / --table)")
    pe.add_argument("--redis", default=None, help="Redis URL (--follow / --table; default: the local run's)")
    pe.add_argument("--runs-dir", default="runs", help="the runs directory (default runs): where a local "
                    "`keisei run` records its Redis URL; --follow saves RUNS_DIR/RUN/eval/eval.jsonl, "
                    "RUNS_DIR/RUN/eval/elo_table.json and TensorBoard scalars elo/OPPONENT in RUNS_DIR/RUN/tensorboard; "
                    "--table reads the saved table when the run's Redis does not answer")
    pe.add_argument("--every", type=int, default=None, help="--follow: every K-th version (default config)")
    pe.add_argument("--opponents", nargs="+", default=None, help="--follow: opponent specs (default config)")
    pe.add_argument("--poll-s", type=float, default=5.0, help="--follow: seconds between polls")
    pe.add_argument("--max-evals", type=int, default=None, help="--follow: stop after this many evaluations")
    pe.add_argument("--no-tensorboard", action="store_true", help="--follow: no TensorBoard scalars")

    pu = sub.add_parser(
        "usi", help="the trained network with tree search as a USI engine on stdin/stdout",
        description="Serve the USI protocol on stdin/stdout: a PUCT tree search over the checkpoint's "
        "network (go nodes / movetime / byoyomi / btime wtime binc winc / infinite / ponder, with "
        "stop and ponderhit), or one forward pass per move with --nodes 0. USI options: Nodes, "
        "BatchSize, Threads, Device, USI_Ponder, USI_Hash, ByoyomiMargin, MateSearchPlies, "
        "InfoInterval, Temperature, Seed, MaxMovesToDraw (a bad value is answered with 'info string' and ignored).")
    pu.add_argument("--checkpoint", required=True, help="checkpoint file (ckpt_*.pt)")
    pu.add_argument("--nodes", type=int, default=800,
                    help="simulations per move when go gives no limit; 0 = no search, one forward pass "
                    "per move (USI option Nodes; default 800)")
    pu.add_argument("--batch-size", type=int, default=16, help="leaves per forward pass (USI option BatchSize)")
    pu.add_argument("--temperature", type=float, default=0.0,
                    help="0 = best move (default); > 0 samples (USI option Temperature)")
    pu.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (USI option Device)")
    pu.add_argument("--seed", type=int, default=0, help="sampling seed (USI option Seed)")
    pu.add_argument("--name", default=None, help="id name (default: keisei-stream <checkpoint stem>)")
    pu.add_argument("--threads", type=int, default=1, help="torch intra-op threads (USI option Threads; default 1)")
    pu.add_argument("--log", default=None, help="append the protocol dialogue to this file")

    games_doc = ("A run's games come from the `games` stream in its Redis (capped at stream.games_maxlen, gone "
                 "with the private Redis when `keisei run` ends) and from its archive runs/{run}/games "
                 "(every self-play game, written by the learner about 10 s after the game ends, kept after "
                 "the run). --source auto (default): the newest games from the stream while the run's Redis "
                 "answers, older ones (--count beyond the stream, --all) from the archive; when Redis does not "
                 "answer (a finished run), the archive alone. --source stream|archive: only that one.")
    pg = sub.add_parser("games", help="export, show or list recorded games (live or finished runs)",
                        description=games_doc)
    gsub = pg.add_subparsers(dest="games_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--redis", default=None, help="Redis URL (default: the local run's, recorded in "
                       "RUNS_DIR/RUN/redis.url while it runs)")
        q.add_argument("--run", default="quickstart", help="run id")
        q.add_argument("--runs-dir", default="runs", help="the runs directory: a local run's Redis URL and "
                       "its game archive RUNS_DIR/RUN/games (default: runs)")
        q.add_argument("--source", choices=("auto", "stream", "archive"), default="auto",
                       help="auto (default): the stream while Redis answers, the archive for older games "
                       "or a finished run; stream: Redis only; archive: the files only")
        q.add_argument("--eval-json", default=None, help="read the games of a `keisei eval --json` file instead")
        q.add_argument("--count", type=int, default=10, help="newest N games (default 10)")
        q.add_argument("--all", action="store_true", help="every game the sources hold (overrides --count)")

    e = gsub.add_parser("export", help="write games as KIF, CSA or USI", description=games_doc)
    common(e)
    e.add_argument("--format", choices=EXPORT_FORMATS, default="kif")
    e.add_argument("--out", required=True, help="output directory")
    s = gsub.add_parser("show", help="print one game's board and moves; optionally SVG", description=games_doc)
    common(s)
    s.add_argument("--index", type=int, default=-1, help="which of the listed games (default -1: the newest)")
    s.add_argument("--ply", type=int, default=None, help="show the board after this many moves (default: the end)")
    s.add_argument("--svg", default=None, help="also write the board as an SVG file")
    ls = gsub.add_parser("list", help="table of the newest games", description=games_doc)
    common(ls)

    pp = sub.add_parser("plot", help="draw a run's learning curve and Elo over versions (PNG/SVG; needs matplotlib)",
                        description="The learning curve (trained positions, positions/s, policy and value loss, "
                        "entropy, policy lag, per update over time) from the run's metrics stream, and the Elo over "
                        "versions from its continuous evaluation (keisei run --eval, keisei eval --follow): from "
                        "the run's Redis while it answers, else from RUNS_DIR/RUN/metrics.jsonl and "
                        "RUNS_DIR/RUN/eval/elo_table.json, which a finished run leaves behind.")
    pp.add_argument("--run", default="quickstart", help="run id")
    pp.add_argument("--redis", default=None, help="Redis URL (default: the local run's, recorded in "
                    "RUNS_DIR/RUN/redis.url while it runs)")
    pp.add_argument("--runs-dir", default="runs", help="the runs directory (default: runs)")
    pp.add_argument("--source", choices=("auto", "redis", "files"), default="auto",
                    help="auto (default): Redis while it answers, else the run directory's files")
    pp.add_argument("--out", default=None, help="output directory (default: RUNS_DIR/RUN/plots)")
    pp.add_argument("--format", choices=("png", "svg", "pdf"), default="png")
    pp.add_argument("--note", default="", help="a second title line (e.g. what run, machine, date and commit)")

    pa = sub.add_parser("users", help="create the run's least-privilege Redis users (learner, evaluator, monitor, "
                        "reader, one per worker) on a server and print their URLs")
    pa.add_argument("--redis", required=True, action="append", help="URL of a user allowed to run ACL SETUSER (the "
                    "server's admin); repeat it for every node of the run (replicas, a Sentinel group's other nodes: "
                    "ACL users are not replicated): the users get the same passwords on each")
    pa.add_argument("--run", required=True, help="run id")
    pa.add_argument("--url", default=None, help="the URL the processes will use (default: the first --redis without its "
                    "user; e.g. redis+sentinel://s1:26379,s2:26379,s3:26379/SERVICE/0 for a Sentinel group)")
    pa.add_argument("--workers", type=int, default=0, help="also create one user for each of the worker ids "
                    "w0 .. w{N-1} (the ids keisei run gives; python -m workers --id ID must use its user's id)")
    pa.add_argument("--worker-id", dest="worker_ids", action="append", default=[], metavar="ID",
                    help="also create a user for this worker id (repeatable)")
    pa.add_argument("--role", default=None, metavar="ROLE",
                    help="create only this role's user (learner, evaluator, monitor, reader or worker:ID) with "
                    "--password: the same user on a host's replica (ACL users are not replicated)")
    pa.add_argument("--password", default=os.environ.get("KEISEI_USER_PASSWORD"),
                    help="with --role: its password (default: the environment variable KEISEI_USER_PASSWORD)")
    pa.add_argument("--host-copies", action="store_true",
                    help="the workers read config, control and weights from their host's copy of the run (keisei "
                    "relay, or a replica as the reader): their users here get no read of those keys")
    pa.add_argument("--rules", action="store_true", help="only print the ACL SETUSER rules (for redis-cli); "
                    "connect to nothing")
    pa.add_argument("--server-version", default=None, metavar="X.Y",
                    help="with --rules: the rules for this server version (default: 7.2, the newest rules)")

    pl = sub.add_parser("relay", help="keep this host's read-only copy of a run (weights, config, control) for the "
                        "host's workers: each version crosses the network once per host",
                        description="Start a private Redis on a unix socket on this host and copy into it, from the "
                        "run's primary, each new weights version (SHA-256 checked), the config and the control key; "
                        "the host's workers read there (python -m workers --read-redis URL, printed at the start) and "
                        "write to the primary. Runs until SIGTERM/Ctrl-C (docs/scaling.md, \"Many hosts\").")
    pl.add_argument("--redis", default=os.environ.get("KEISEI_REDIS"), required="KEISEI_REDIS" not in os.environ,
                    help="the run's primary as its reader user: redis://keisei-RUN-reader:PW@host:6379/0 or "
                    "redis+sentinel://keisei-RUN-reader:PW@s1:26379,s2:26379/SERVICE/0 (default: the environment "
                    "variable KEISEI_REDIS)")
    pl.add_argument("--run", required=True, help="run id")
    pl.add_argument("--socket", required=True, help="unix socket of this host's copy (e.g. /run/keisei/RUN.sock)")
    pl.add_argument("--dir", default=None, help="directory of its log (default: the socket's)")
    pl.add_argument("--maxmemory", default="0", help="maxmemory of this host's copy (default 0: no limit; it holds two "
                    "weights blobs and a few small keys)")
    pl.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keisei`` console script: parse ``argv`` (default ``sys.argv[1:]``)
    and run the sub-command.

    Returns:
        the exit code (0 ok; what the command returns otherwise).

    Raises:
        SystemExit: from argparse, for ``--help`` and bad arguments.
    """
    args = build_parser().parse_args(argv)
    # the command's module is imported only now: ``keisei --help`` and argument errors stay fast
    # (no torch, Redis client, cshogi or rich), and each command loads only what it uses
    module = importlib.import_module(f"keisei_stream.cli.{args.command}")
    return int(module.command(args) or 0)
