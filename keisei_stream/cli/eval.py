"""``keisei eval``: a match between two player specs (score and Elo, optionally every game as
JSON), the run's Elo-over-versions table (``--table``), or continuous evaluation (``--follow``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from keisei_stream.cli.common import resolve_redis
from keisei_stream.config import ConfigError, config_from_json
from keisei_stream.play.follow import elo_table, follow, render_elo_table
from keisei_stream.play.match import play_match
from keisei_stream.play.players import SpecError
from keisei_stream.wire import embedded_redis


def _checkpoint_max_plies(path: str) -> int:
    """``env.max_plies`` of a checkpoint's stored config, 256 when the file cannot be read (the
    match then reports the checkpoint's error itself)."""
    # imported here: torch (about 2 s to import) is needed to read a checkpoint, and only then
    from keisei_stream.rl.checkpoint import CheckpointError, read_checkpoint

    try:
        return config_from_json(read_checkpoint(path)["config_json"]).env.max_plies
    except (CheckpointError, ConfigError, KeyError):
        return 256


def command(args: argparse.Namespace) -> int:
    """``keisei eval``: returns the process exit code (0 ok, 2 bad arguments or player specs)."""
    console = Console(stderr=True)
    if args.table or args.follow:
        url = resolve_redis(args)
        if args.table:
            Console().print(render_elo_table(elo_table(embedded_redis.connect(url), args.run)))
            return 0
        n = follow(url, args.run, every=args.every, games=args.games, opponents=args.opponents,
                   processes=args.processes, opening_plies=args.opening_plies, temperature=args.temperature,
                   device=args.device, poll_s=args.poll_s, max_evals=args.max_evals, seed=args.seed,
                   progress=not args.no_progress)
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
