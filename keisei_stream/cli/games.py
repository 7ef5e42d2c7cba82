"""``keisei games export|show|list``: the newest games of a run's ``games`` stream, or the games
of a ``keisei eval --json`` file, written as KIF/CSA/USI, shown on the terminal, or listed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import cshogi
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from keisei_stream.cli.common import resolve_redis
from keisei_stream.play.records import (Game, RecordError, board_after, export_games, read_eval_games,
                                        read_stream_games, to_svg)
from keisei_stream.wire import embedded_redis


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


def _load(args: argparse.Namespace) -> list[Game]:
    if args.eval_json:
        games = read_eval_games(args.eval_json)
        return games[-args.count:] if args.count else games
    return read_stream_games(embedded_redis.connect(resolve_redis(args)), args.run, args.count)


def command(args: argparse.Namespace) -> int:
    """``keisei games export|show|list``: returns the exit code (0 ok, 1 no games, 2 bad input)."""
    console = Console()
    try:
        games = _load(args)
    except (RecordError, ValueError, OSError, KeyError, TypeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if not games:
        console.print("no games found")
        return 1
    cmd = args.games_command
    if cmd == "export":
        paths = export_games(games, args.format, args.out)
        console.print(f"wrote {len(games)} game(s) to {len(paths)} file(s) in {args.out}")
    elif cmd == "show":
        try:
            game = games[args.index]
        except IndexError:
            console.print(f"[red]error:[/red] only {len(games)} games")
            return 2
        show_game(game, args.ply, console, args.svg)
    else:
        t = Table(title="games", title_justify="left")
        for c in ("#", "id", "black", "white", "result", "reason", "plies"):
            t.add_column(c)
        for i, g in enumerate(games):
            t.add_row(str(i - len(games)), g.id, g.black, g.white, {1: "1-0", -1: "0-1"}.get(g.result, "½-½"),
                      g.reason, str(g.plies))
        console.print(t)
    return 0
