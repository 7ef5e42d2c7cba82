"""``keisei games export|show|list``: the newest games of a run, or the games of a ``keisei eval
--json`` file, written as KIF/CSA/USI, shown on the terminal, or listed.

A run's games come from two places (``--source``): the ``games`` stream in the run's Redis (capped
at ``stream.games_maxlen``, gone with a private Redis when ``keisei run`` ends) and the archive
``runs/{run}/games`` (:mod:`keisei_stream.wire.archive`: every self-play game, written by the
learner within ``flush_s`` seconds of the game's end, kept after the run). ``auto`` (the default)
reads the newest games from the stream when Redis answers and what the stream no longer holds
from the archive (entries older than the oldest one read, so nothing twice); when Redis does not
answer it reads the archive alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import cshogi
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from keisei_stream.cli.common import find_redis, make_console, run_dir
from keisei_stream.play.records import (Game, RecordError, board_after, export_games, read_archive_games,
                                        games_from_entries, read_eval_games, to_svg)
from keisei_stream.wire import archive as archives
from keisei_stream.wire import status
from keisei_stream.wire.keys import Keys


def board_renderable(board: cshogi.Board, last_move: Optional[int] = None) -> Table:
    """A rich Table of the board: Black's pieces upper-case (bold), White's lower-case (red),
    promoted with ``+``, files 9..1 left to right, ranks a..i top to bottom; the square of
    ``last_move`` (a cshogi move code) in reverse video."""
    t = Table(show_header=True, box=None, pad_edge=False, padding=(0, 1))
    t.add_column("")
    for f in range(9, 0, -1):
        t.add_column(str(f), justify="center")
    to_sq = cshogi.move_to(last_move) if last_move else -1
    for rank in range(9):
        row = [Text("abcdefghi"[rank], style="dim")]
        for f in range(9, 0, -1):
            sq = (f - 1) * 9 + rank
            pc = board.piece(sq)
            if pc == 0:
                cell = Text("·", style="dim")
            else:
                pt = pc & 15
                sym = cshogi.PIECE_SYMBOLS[pt]
                black = pc < 16
                cell = Text(sym.upper() if black else sym, style="bold" if black else "red")
            if sq == to_sq:
                cell.stylize("reverse")
            row.append(cell)
        t.add_row(*row)
    return t


def _hand_text(hand: list[int]) -> str:
    names = ["P", "L", "N", "S", "G", "B", "R"]
    s = " ".join(f"{n}{c if c > 1 else ''}" for n, c in zip(names, hand) if c)
    return s or "-"


def show_game(game: Game, ply: Optional[int], console: Console, svg: Optional[str] = None) -> None:
    """Print a game header, the board after ``ply`` moves (default: the end) and the move list;
    optionally write that board as an SVG file (:func:`keisei_stream.play.records.to_svg`)."""
    board, last, n = board_after(game, ply)
    res = {1: "Black won", -1: "White won"}.get(game.result, "draw")
    black_hand, white_hand = board.pieces_in_hand
    header = (f"[bold]{game.id}[/bold]  {game.black} (Black) vs {game.white} (White): {res}, "
              f"{game.reason}, {game.plies} plies")
    body = Group(f"White hand: {_hand_text(white_hand)}", board_renderable(board, last),
                 f"Black hand: {_hand_text(black_hand)}",
                 f"after {n} plies, {'Black' if board.turn == cshogi.BLACK else 'White'} to move")
    console.print(header)
    console.print(Panel.fit(body))
    moves = " ".join(f"{i + 1}.{m}" for i, m in enumerate(game.moves))
    console.print(moves, highlight=False, soft_wrap=False)
    if svg:
        Path(svg).write_text(to_svg(game, ply))
        console.print(f"SVG written to {svg}")


class SourceError(Exception):
    """The games asked for cannot be read (the message says why); exit code 1."""


def _load_run(args: argparse.Namespace) -> tuple[list[Game], str]:
    """The newest ``--count`` games of the run (``--all``: every one), oldest first, from the
    sources ``--source`` allows (``auto``: the ``games`` stream when the run's Redis answers, the
    archive for what the stream no longer holds or when Redis does not answer), and a line
    saying where they came from.

    Raises:
        SourceError: ``--source stream`` without a reachable Redis, or no source at all.
    """
    count = None if args.all else max(0, args.count)
    archive_dir = run_dir(args) / "games"
    stream: list[Game] = []
    oldest_id = None
    rr = None
    if args.source in ("auto", "stream"):
        rr = find_redis(args)
        if rr.client is None and args.source == "stream":
            raise SourceError(f"--source stream: {rr.why}")
    if rr is not None and rr.client is not None:
        key = Keys(args.run).games
        n = rr.client.xlen(key) if count is None else count
        entries = status.read_stream(rr.client, key, n) if n else []
        oldest_id = entries[0][0] if entries else None
        stream = games_from_entries(entries)
        if args.source == "stream" or (count is not None and len(entries) >= count):
            return stream, f"{len(stream)} game(s) from the games stream at {rr.url}"
    if not archives.chunks(archive_dir):
        if args.source == "archive":
            raise SourceError(f"no game archive at {archive_dir}")
        if rr.client is None:
            raise SourceError(f"{rr.why}, and no game archive at {archive_dir}")
        return stream, f"{len(stream)} game(s) from the games stream at {rr.url} (no archive at {archive_dir})"
    need = None if count is None else count - len(stream)
    older = read_archive_games(archive_dir, need, before=oldest_id)
    if rr is None:
        return older, f"{len(older)} game(s) from the archive {archive_dir}"
    if rr.client is None:
        return older, f"{len(older)} game(s) from the archive {archive_dir} ({rr.why})"
    return older + stream, (f"{len(older) + len(stream)} game(s): {len(older)} from the archive {archive_dir}, "
                            f"{len(stream)} from the games stream at {rr.url}")


def _load(args: argparse.Namespace) -> tuple[list[Game], str]:
    if args.eval_json:
        games = read_eval_games(args.eval_json)
        games = games if args.all or not args.count else games[-args.count:]
        return games, f"{len(games)} game(s) from {args.eval_json}"
    return _load_run(args)


def command(args: argparse.Namespace) -> int:
    """``keisei games export|show|list``: returns the exit code (0 ok, 1 no games, 2 bad input)."""
    console = make_console()
    note = Console(stderr=True, soft_wrap=True)
    try:
        games, source = _load(args)
    except SourceError as exc:
        note.print(f"[red]error:[/red] {exc}")
        return 1
    except (RecordError, ValueError, OSError, KeyError, TypeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if not games:
        console.print(f"no games found ({source})")
        return 1
    cmd = args.games_command
    if cmd == "export":
        note.print(source, highlight=False)
        paths = export_games(games, args.format, args.out)
        console.print(f"wrote {len(games)} game(s) to {len(paths)} file(s) in {args.out}")
    elif cmd == "show":
        note.print(source, highlight=False)
        try:
            game = games[args.index]
        except IndexError:
            console.print(f"[red]error:[/red] only {len(games)} games")
            return 2
        show_game(game, args.ply, console, args.svg)
    else:
        t = Table(title="games", title_justify="left")
        for c in ("#", "id", "black", "white", "result", "reason", "plies"):
            t.add_column(c, no_wrap=c in ("#", "id"))
        for i, g in enumerate(games):
            t.add_row(str(i - len(games)), g.id, g.black, g.white, {1: "1-0", -1: "0-1"}.get(g.result, "½-½"),
                      g.reason, str(g.plies))
        console.print(t)
        console.print(source, highlight=False, soft_wrap=True)
    return 0
