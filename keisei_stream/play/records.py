"""Game records: the ``games`` stream's fields, export to KIF / CSA / USI, and terminal display.

**Stream fields** (one ``games`` stream entry per finished game; :func:`game_fields` writes them,
:func:`parse_game_fields` reads them back)::

    start_sfen     full SFEN of the real start position (cshogi.STARTING_SFEN normally)
    moves          space-separated USI moves, random opening moves included
    result         "1" Black won, "-1" White won, "0" draw
    result_str     "1-0" | "0-1" | "1/2-1/2"
    reason         EndReason name: CHECKMATE, REPETITION_DRAW, PERPETUAL_CHECK, ENTERING_KING,
                   MAX_PLIES, ILLEGAL, RESIGN, TIMEOUT
    plies          number of moves
    opening_plies  how many of the first moves were random opening moves
    ...            anything else the writer adds (worker, version, black, white, time) is kept
                   as metadata

A ``usi`` field holding ``position startpos|sfen ... moves ...`` is accepted instead of
``start_sfen`` + ``moves``.

**Export formats**: KIF (``cshogi.KIF.Exporter``, cp932 as Japanese GUIs expect, ``.kif``), CSA
V2.2 (``cshogi.CSA.Exporter``, ``.csa``), and USI (one ``position ... moves ...`` line per game
followed by a ``# result reason`` comment line, ``.usi``). Both KIF and CSA re-parse with cshogi's
parsers (``cshogi.KIF.Parser``, ``cshogi.CSA.Parser``) to the same moves. Endings: checkmate ->
KIF 詰み / CSA %TORYO; resign -> 投了 / %TORYO; repetition -> 千日手 / %SENNICHITE; perpetual check,
illegal move, crash -> 反則負け or 反則勝ち / %ILLEGAL_MOVE or %{+,-}ILLEGAL_ACTION; timeout ->
切れ負け / %TIME_UP; entering king -> 入玉勝ち / %KACHI; max plies -> 持将棋 / %MAX_MOVES.

CLI: ``keisei games export|show|list`` (:func:`add_games_arguments`, :func:`cli_games`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import cshogi
from cshogi import CSA, KIF

from keisei_stream.shogi import STARTING_SFEN, EndReason, GameRecord

#: lower-case reason names used in exports (evaluation's reasons; EndReason names map onto them).
_ENDREASON_TO_NAME = {
    "CHECKMATE": "checkmate", "REPETITION_DRAW": "repetition", "PERPETUAL_CHECK": "perpetual_check",
    "ENTERING_KING": "entering_king", "MAX_PLIES": "max_plies", "ILLEGAL": "illegal", "RESIGN": "resign",
    "TIMEOUT": "timeout", "NONE": "unknown",
}
_NAME_TO_ENDREASON = {v: k for k, v in _ENDREASON_TO_NAME.items()}
_NAME_TO_ENDREASON["crash"] = "ILLEGAL"


class RecordError(ValueError):
    """A game record's fields are missing, malformed, or its moves are not legal."""


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, (bytes, bytearray)) else str(x)


# ------------------------------------------------------------------------------------------------
# stream fields <-> GameRecord


def game_fields(record: GameRecord, **extra: Any) -> dict[str, str | int]:
    """Fields of one ``games`` stream entry for a finished game (module docstring).

    Args:
        record: ``keisei_stream.shogi.GameRecord``.
        extra: more fields (``worker``, ``version``, ...); values are written as ``str``.

    Returns:
        dict ready for ``XADD``.
    """
    d: dict[str, str | int] = dict(record.to_dict())
    for k, v in extra.items():
        d[k] = v if isinstance(v, (int, str)) else str(v)
    return d


def parse_game_fields(fields: dict) -> GameRecord:
    """Rebuild a :class:`~keisei_stream.shogi.GameRecord` from stream fields (bytes or str keys).

    The moves are replayed with cshogi, so a record that parses is a legal game.

    Raises:
        RecordError: missing fields, unknown reason, bad SFEN, illegal or malformed move.
    """
    f = {_s(k): _s(v) for k, v in fields.items()}
    if "usi" in f and "moves" not in f:
        start, moves = _parse_position_line(f["usi"])
    else:
        if "moves" not in f:
            raise RecordError("game entry has neither 'moves' nor 'usi'")
        start = f.get("start_sfen", "startpos") or "startpos"
        moves = f["moves"].split()
    if start in ("startpos", ""):
        start = STARTING_SFEN
    try:
        result = int(f.get("result", "0"))
    except ValueError:
        raise RecordError(f"bad result {f.get('result')!r}") from None
    if result not in (-1, 0, 1):
        raise RecordError(f"bad result {result}")
    reason_text = f.get("reason", "NONE")
    try:
        reason = EndReason(int(reason_text)) if reason_text.isdigit() else EndReason[reason_text.upper()]
    except (KeyError, ValueError):
        name = _NAME_TO_ENDREASON.get(reason_text.lower())
        if name is None:
            raise RecordError(f"unknown reason {reason_text!r}") from None
        reason = EndReason[name]
    _replay(start, moves)
    try:
        opening = int(f.get("opening_plies", "0"))
    except ValueError:
        opening = 0
    return GameRecord(start_sfen=start, moves=moves, result=result, reason=reason, plies=len(moves),
                      opening_plies=opening)


def _parse_position_line(text: str) -> tuple[str, list[str]]:
    toks = text.split()
    if toks and toks[0] == "position":
        toks = toks[1:]
    if not toks:
        raise RecordError("empty position line")
    moves: list[str] = []
    if "moves" in toks:
        i = toks.index("moves")
        toks, moves = toks[:i], toks[i + 1:]
    if toks[0] == "startpos":
        return STARTING_SFEN, moves
    if toks[0] == "sfen" and len(toks) >= 4:
        return " ".join(toks[1:5]), moves
    raise RecordError(f"bad position line {text[:60]!r}")


def _replay(start: str, moves: list[str]) -> cshogi.Board:
    from keisei_stream.play.usi import check_sfen

    try:
        start = check_sfen(start)
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    board = cshogi.Board()
    board.set_sfen(start)
    if not board.is_ok():
        raise RecordError(f"bad start sfen {start!r}")
    for i, mv in enumerate(moves):
        try:
            m = board.move_from_usi(mv)
        except Exception:
            m = 0
        if not m or not board.is_legal(m):
            raise RecordError(f"move {i + 1} {mv!r} is not legal")
        board.push(m)
    return board


# ------------------------------------------------------------------------------------------------
# a game ready for export


@dataclass
class Game:
    """A game for export/display: ``start_sfen`` (full SFEN), ``moves`` (USI), ``result`` (+1/-1/0
    for Black), ``reason`` (lower-case name: checkmate, repetition, perpetual_check, entering_king,
    max_plies, illegal, resign, timeout, crash, unknown), ``black``/``white`` names, ``id``, ``meta``."""

    start_sfen: str
    moves: list[str]
    result: int
    reason: str
    black: str = "black"
    white: str = "white"
    id: str = "game"
    meta: dict = field(default_factory=dict)

    @property
    def plies(self) -> int:
        return len(self.moves)

    def usi_position(self) -> str:
        """``position startpos|sfen ... moves ...``."""
        head = "position startpos" if self.start_sfen == STARTING_SFEN else f"position sfen {self.start_sfen}"
        return head + (" moves " + " ".join(self.moves) if self.moves else "")


def game_from_record(record: GameRecord, *, id: str = "game", black: str = "black", white: str = "white",
                     meta: Optional[dict] = None) -> Game:
    """:class:`Game` from a ``GameRecord``."""
    reason = _ENDREASON_TO_NAME.get(EndReason(record.reason).name, "unknown")
    return Game(record.start_sfen, list(record.moves), int(record.result), reason, black, white, id, dict(meta or {}))


def game_from_fields(fields: dict, entry_id: str = "game") -> Game:
    """:class:`Game` from a ``games`` stream entry (extra fields go to ``meta``; ``black``/``white``
    fields, if present, name the players, else ``worker``/``version`` describe them).

    Raises:
        RecordError: as :func:`parse_game_fields`.
    """
    rec = parse_game_fields(fields)
    f = {_s(k): _s(v) for k, v in fields.items()}
    known = {"start_sfen", "moves", "usi", "result", "result_str", "reason", "plies", "opening_plies"}
    meta = {k: v for k, v in f.items() if k not in known}
    who = f"self-play v{meta['version']}" if "version" in meta else "self-play"
    return game_from_record(rec, id=_s(entry_id), black=meta.get("black", who), white=meta.get("white", who), meta=meta)


def game_from_eval(rec: dict) -> Game:
    """:class:`Game` from one record of ``keisei eval --json`` (``records`` list).

    Raises:
        RecordError: bad SFEN or illegal moves; KeyError/TypeError/ValueError: not such a record.
    """
    start = rec.get("start_sfen", "startpos")
    start = STARTING_SFEN if start == "startpos" else start
    _replay(start, list(rec["moves"]))
    meta = {k: rec[k] for k in ("detail", "a_color", "opening_plies") if k in rec}
    return Game(start, list(rec["moves"]), int(rec["result"]), rec.get("reason", "unknown"),
                rec.get("black", "black"), rec.get("white", "white"), f"eval-{rec.get('game', 0):04d}", meta)


# ------------------------------------------------------------------------------------------------
# export


def _board(game: Game) -> cshogi.Board:
    b = cshogi.Board()
    b.set_sfen(game.start_sfen)
    return b


def _winner_jp(result: int) -> str:
    return "先手" if result > 0 else "後手"


def to_kif(game: Game) -> str:
    """The game as KIF text (header, numbered moves, the ending and the ``まで`` result line)."""
    exp = KIF.Exporter()
    exp.kifu = io.StringIO()
    exp.prev_move = None
    exp.move_number = 1
    board = _board(game)
    exp.header([game.black, game.white], handicap=None if game.start_sfen == STARTING_SFEN else board.copy())
    for mv in game.moves:
        m = board.move_from_usi(mv)
        exp.move(m)
        board.push(m)
    n = game.plies
    side_to_move_loses = game.result != 0 and (game.result > 0) == (board.turn == cshogi.WHITE)
    word = {"checkmate": "詰み", "resign": "投了", "repetition": "千日手", "max_plies": "持将棋",
            "entering_king": "入玉勝ち", "timeout": "切れ負け"}.get(game.reason)
    if word is None:  # illegal, crash, perpetual check, unknown
        word = "反則負け" if side_to_move_loses else "反則勝ち"
    exp.kifu.write(f"{n + 1:>4} {word}\n")
    if game.result == 0:
        tail = "千日手" if game.reason == "repetition" else "持将棋"
        exp.kifu.write(f"まで{n}手で{tail}\n")
    else:
        how = "入玉勝ち" if game.reason == "entering_king" else "勝ち"
        exp.kifu.write(f"まで{n}手で{_winner_jp(game.result)}の{how}\n")
    return exp.kifu.getvalue()


def to_csa(game: Game) -> str:
    """The game as CSA V2.2 text (names, start position, moves, ``%`` ending)."""
    exp = CSA.Exporter()
    exp.f = io.StringIO()
    board = _board(game)
    var_info = {k: str(v) for k, v in game.meta.items() if k in ("worker", "version", "detail") and str(v)}
    exp.info(board.copy(), [game.black, game.white], var_info=var_info or None, version="V2.2")
    for mv in game.moves:
        m = board.move_from_usi(mv)
        exp.move(m)
        board.push(m)
    loser_sign = "+" if game.result < 0 else "-"
    side_to_move_loses = game.result != 0 and (game.result > 0) == (board.turn == cshogi.WHITE)
    end = {"checkmate": "%TORYO", "resign": "%TORYO", "repetition": "%SENNICHITE", "max_plies": "%MAX_MOVES",
           "entering_king": "%KACHI", "timeout": "%TIME_UP"}.get(game.reason)
    if end is None:
        if game.reason == "illegal" and side_to_move_loses:
            end = "%ILLEGAL_MOVE"
        elif game.result == 0:
            end = "%CHUDAN"
        else:
            end = f"%{loser_sign}ILLEGAL_ACTION"
    exp.endgame(end)
    return exp.f.getvalue()


def to_usi(game: Game) -> str:
    """``position ... moves ...`` then ``# <result> <reason> <black> vs <white>`` (two lines)."""
    res = {1: "1-0", -1: "0-1"}.get(game.result, "1/2-1/2")
    return f"{game.usi_position()}\n# {res} {game.reason} {game.black} vs {game.white}\n"


FORMATS = {"kif": (to_kif, ".kif", "cp932"), "csa": (to_csa, ".csa", "utf-8"), "usi": (to_usi, ".usi", "utf-8")}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def export_games(games: Iterable[Game], fmt: str, out_dir: str | Path) -> list[Path]:
    """Write each game to ``out_dir/{id}.{kif|csa}``, or all games to ``out_dir/games.usi``.

    Raises:
        ValueError: unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (kif, csa, usi)")
    fn, ext, enc = FORMATS[fmt]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "usi":
        path = out / "games.usi"
        path.write_text("".join(fn(g) for g in games), encoding=enc)
        return [path]
    paths = []
    for g in games:
        path = out / (_safe(g.id) + ext)
        path.write_text(fn(g), encoding=enc, errors="replace")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# reading games


def read_stream_games(r, run: str, count: int = 10) -> list[Game]:
    """The newest ``count`` games of the run's ``games`` stream, oldest first (bad entries skipped)."""
    from keisei_stream.wire.keys import Keys

    entries = r.xrevrange(Keys(run).games, count=count)
    games = []
    for eid, fields in reversed(entries):
        try:
            games.append(game_from_fields(fields, _s(eid).replace("-", "_")))
        except RecordError as exc:
            print(f"skipping games entry {_s(eid)}: {exc}", file=sys.stderr)
    return games


def read_eval_games(path: str | Path) -> list[Game]:
    """The games of a ``keisei eval --json`` file."""
    data = json.loads(Path(path).read_text())
    return [game_from_eval(rec) for rec in data.get("records", [])]


# ------------------------------------------------------------------------------------------------
# display


def board_renderable(board: cshogi.Board, last_move: Optional[int] = None):
    """A rich Table of the board: Black's pieces upper-case (bold), White's lower-case (red),
    promoted with ``+``, files 9..1 left to right, ranks a..i top to bottom; hands below."""
    from rich.table import Table
    from rich.text import Text

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


def show_game(game: Game, ply: Optional[int] = None, console=None, svg: Optional[str] = None) -> None:
    """Print a game header, the board after ``ply`` moves (default: the end) and the move list;
    optionally write the board as SVG (``cshogi.Board.to_svg``)."""
    from rich.console import Console, Group
    from rich.panel import Panel

    console = console or Console()
    n = game.plies if ply is None else max(0, min(ply, game.plies))
    board = _board(game)
    last = None
    for mv in game.moves[:n]:
        last = board.move_from_usi(mv)
        board.push(last)
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
        Path(svg).write_text(str(board.to_svg(last) if last else board.to_svg()))
        console.print(f"SVG written to {svg}")


# ------------------------------------------------------------------------------------------------
# CLI


def add_games_arguments(p: argparse.ArgumentParser) -> None:
    """``keisei games export|show|list`` arguments."""
    sub = p.add_subparsers(dest="games_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--redis", default=None, help="Redis URL (default: the local run's)")
        q.add_argument("--run", default="quickstart", help="run id")
        q.add_argument("--runs-dir", default="runs", help="where a local `keisei run` records its Redis URL")
        q.add_argument("--eval-json", default=None, help="read the games of a `keisei eval --json` file instead")
        q.add_argument("--count", type=int, default=10, help="newest N games (default 10)")

    e = sub.add_parser("export", help="write games as KIF, CSA or USI")
    common(e)
    e.add_argument("--format", choices=sorted(FORMATS), default="kif")
    e.add_argument("--out", required=True, help="output directory")
    s = sub.add_parser("show", help="print one game's board and moves; optionally SVG")
    common(s)
    s.add_argument("--index", type=int, default=-1, help="which of the listed games (default -1: the newest)")
    s.add_argument("--ply", type=int, default=None, help="show the board after this many moves (default: the end)")
    s.add_argument("--svg", default=None, help="also write the board as an SVG file")
    ls = sub.add_parser("list", help="table of the newest games")
    common(ls)


def _load(args) -> list[Game]:
    if args.eval_json:
        games = read_eval_games(args.eval_json)
        return games[-args.count:] if args.count else games
    from keisei_stream.play.evaluation import _resolve_url
    from keisei_stream.play.players import _connect

    return read_stream_games(_connect(_resolve_url(args)), args.run, args.count)


def cli_games(args) -> int:
    """``keisei games ...``: returns the exit code (0 ok, 1 no games, 2 bad input)."""
    from rich.console import Console
    from rich.table import Table

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


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m keisei_stream.play.records ...`` (same as ``keisei games``)."""
    p = argparse.ArgumentParser(prog="keisei games")
    add_games_arguments(p)
    return cli_games(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
