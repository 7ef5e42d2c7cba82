"""``keisei eval``: a match between two player specs (score and Elo, optionally every game as
JSON), the run's Elo-over-versions table (``--table``), or continuous evaluation (``--follow``).

``--follow`` also saves every evaluation in ``{runs_dir}/{run}/eval`` (``eval.jsonl``,
``elo_table.json``) and the Elo curve in ``{runs_dir}/{run}/tensorboard``
(:class:`keisei_stream.play.evaluation.follow.EvalFiles`), so ``--table`` still answers after the
run's Redis is gone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

from rich.console import Console

from keisei_stream.cli.common import find_redis, run_dir
from keisei_stream.config import ConfigError, config_from_json
from keisei_stream.play.evaluation.follow import (
    ELO_TABLE, elo_table, follow, merge_tables, render_elo_table, saved_elo_table,
)
from keisei_stream.play.evaluation.match import play_match
from keisei_stream.play.players import SpecError
from keisei_stream.wire import client


def _checkpoint_max_plies(path: str) -> int:
    """``env.max_plies`` of a checkpoint's stored config, 256 when the file cannot be read (the
    match then reports the checkpoint's error itself)."""
    # imported here: torch (about 2 s to import) is needed to read a checkpoint, and only then
    from keisei_stream.rl.checkpoint import CheckpointError, read_checkpoint

    try:
        return config_from_json(read_checkpoint(path)["config_json"]).env.max_plies
    except (CheckpointError, ConfigError, KeyError):
        return 256


def _table(args: argparse.Namespace, console: Console) -> int:
    """``keisei eval --table``: the Elo table from the run's Redis (with the versions only the saved
    table still has), or the saved table ``{runs_dir}/{run}/eval/elo_table.json`` when Redis does not
    answer. Returns 0, or 1 when there is neither."""
    eval_dir = run_dir(args) / "eval"
    try:
        saved = saved_elo_table(eval_dir)
    except (OSError, ValueError) as exc:
        console.print(f"[yellow]saved Elo table {eval_dir / ELO_TABLE} unreadable: {exc}[/yellow]")
        saved = []
    rr = find_redis(args)
    if rr.client is not None:
        live = elo_table(rr.client, args.run)
        rows = merge_tables(saved, live)
        extra = len(rows) - len(live)
        source = f"from the Redis at {rr.url}" + (f" and {extra} version(s) saved in {eval_dir / ELO_TABLE}" if extra else "")
    elif saved:
        rows = saved
        mtime = (eval_dir / ELO_TABLE).stat().st_mtime
        when = datetime.datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds")
        source = f"saved in {eval_dir / ELO_TABLE} (updated {when}); {rr.why}"
    else:
        console.print(f"[red]error:[/red] no Elo table: {rr.why}, and none saved at {eval_dir / ELO_TABLE}",
                      highlight=False)
        return 1
    console.print(f"{len(rows)} evaluated version(s) {source}", highlight=False)
    Console().print(render_elo_table(rows))
    return 0


def command(args: argparse.Namespace) -> int:
    """``keisei eval``: returns the process exit code (0 ok, 2 bad arguments or player specs)."""
    console = Console(stderr=True, soft_wrap=True)
    if args.table:
        return _table(args, console)
    if args.follow:
        args.redis = args.redis or os.environ.get(client.URL_ENV)  # keisei run --eval passes it there
        rr = find_redis(args)
        if rr.client is None:
            console.print(f"[red]error:[/red] --follow needs the run's Redis: {rr.why}", highlight=False)
            return 1
        n = follow(rr.url, args.run, every=args.every, games=args.games, opponents=args.opponents,
                   processes=args.processes, opening_plies=args.opening_plies, temperature=args.temperature,
                   device=args.device, poll_s=args.poll_s, max_evals=args.max_evals, seed=args.seed,
                   progress=not args.no_progress, runs_dir=args.runs_dir, tensorboard=not args.no_tensorboard)
        console.print(f"evaluated {n} version(s)")
        return 0
    if args.checkpoint and args.player:
        console.print("[red]error:[/red] give --checkpoint or --player, not both")
        return 2
    player = args.player or (f"checkpoint:{args.checkpoint}" if args.checkpoint else None)
    if player is None:
        console.print("[red]error:[/red] --checkpoint FILE or --player SPEC is required")
        return 2
    max_plies = args.max_plies
    if max_plies is None:
        max_plies = _checkpoint_max_plies(args.checkpoint) if args.checkpoint else 256
    try:
        res = play_match(player, args.opponent, args.games or 100, args.opening_plies or 0, args.processes or 1,
                         max_plies, args.seed, temperature=args.temperature or 0.0, device=args.device,
                         progress=not args.no_progress)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=1))
    print(res.summary(), flush=True)
    return 0
