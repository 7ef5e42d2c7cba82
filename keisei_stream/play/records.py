"""Game records: the ``games`` stream's fields, export to KIF / CSA / USI, and SVG pictures.

**Stream fields** (one ``games`` stream entry per finished game; the worker writes them through
:func:`keisei_stream.wire.status.append_game`, :func:`parse_game_fields` reads them back)::

    start_sfen     full SFEN of the real start position (cshogi.STARTING_SFEN normally)
    moves          space-separated USI moves, random opening moves included
    result         "1" Black won, "-1" White won, "0" draw
    result_str     "1-0" | "0-1" | "1/2-1/2"
    reason         EndReason name: CHECKMATE, REPETITION_DRAW, PERPETUAL_CHECK, ENTERING_KING,
                   MAX_PLIES, ILLEGAL, RESIGN, TIMEOUT, CRASH (read back with
                   ``EndReason.from_label``, which also takes labels and codes)
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

The ``keisei games export|show|list`` command reads games with :func:`read_stream_games`,
:func:`read_archive_games` (the run's durable archive, :mod:`keisei_stream.wire.archive`) or
:func:`read_eval_games` and writes them with :func:`export_games` / :func:`to_svg`.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import cshogi
from cshogi import CSA, KIF

from keisei_stream.shogi import STARTING_SFEN, EndReason, GameRecord, legal_move_from_usi, validate_sfen
from keisei_stream.wire import status
from keisei_stream.wire.client import as_str
from keisei_stream.wire.archive import read_newest
from keisei_stream.wire.keys import Keys

class RecordError(ValueError):
    """A game record's fields are missing, malformed, or its moves are not legal."""


# ------------------------------------------------------------------------------------------------
# stream fields -> GameRecord


def parse_game_fields(fields: dict) -> GameRecord:
    """Rebuild a :class:`~keisei_stream.shogi.GameRecord` from stream fields (bytes or str keys).

    The moves are replayed with cshogi, so a record that parses is a legal game.

    Raises:
        RecordError: missing fields, unknown reason, bad SFEN, illegal or malformed move.
    """
    f = {as_str(k): as_str(v) for k, v in fields.items()}
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
    try:  # a name (CHECKMATE), a label (checkmate) or a code (1): the one vocabulary of EndReason
        reason = EndReason.from_label(reason_text)
    except ValueError:
        raise RecordError(f"unknown reason {reason_text!r}") from None
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
    try:
        start = validate_sfen(start)
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    board = cshogi.Board()
    board.set_sfen(start)
    if not board.is_ok():
        raise RecordError(f"bad start sfen {start!r}")
    for _ in _walk(board, moves):
        pass
    return board


def _walk(board: cshogi.Board, moves: Iterable[str]) -> Iterator[int]:
    """Yield each USI move of ``moves`` as a cshogi move code legal in ``board`` at that point
    (:func:`keisei_stream.shogi.legal_move_from_usi`); ``board`` plays it after the yield.

    Raises:
        RecordError: a move that is not legal (numbered from 1).
    """
    for i, mv in enumerate(moves):
        try:
            m = legal_move_from_usi(board, mv)
        except ValueError:
            raise RecordError(f"move {i + 1} {mv!r} is not legal") from None
        yield m
        board.push(m)


# ------------------------------------------------------------------------------------------------
# a game ready for export


@dataclass
class Game:
    """A game for export/display: ``start_sfen`` (full SFEN), ``moves`` (USI), ``result`` (+1/-1/0
    for Black), ``reason`` (an ``EndReason.label``: checkmate, repetition, perpetual_check, entering_king,
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
    reason = EndReason(record.reason).label
    return Game(record.start_sfen, list(record.moves), int(record.result), reason, black, white, id, dict(meta or {}))


def game_from_fields(fields: dict, entry_id: str = "game") -> Game:
    """:class:`Game` from a ``games`` stream entry (extra fields go to ``meta``; ``black``/``white``
    fields, if present, name the players, else ``worker``/``version`` describe them).

    Raises:
        RecordError: as :func:`parse_game_fields`.
    """
    rec = parse_game_fields(fields)
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    known = {"start_sfen", "moves", "usi", "result", "result_str", "reason", "plies", "opening_plies"}
    meta = {k: v for k, v in f.items() if k not in known}
    who = f"self-play v{meta['version']}" if "version" in meta else "self-play"
    return game_from_record(rec, id=as_str(entry_id), black=meta.get("black", who), white=meta.get("white", who), meta=meta)


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
    """The game as KIF text (header, numbered moves, the ending and the ``まで`` result line).

    Raises:
        RecordError: a move of the game is not legal.
    """
    exp = KIF.Exporter()
    exp.kifu = io.StringIO()
    exp.prev_move = None
    exp.move_number = 1
    board = _board(game)
    exp.header([game.black, game.white], handicap=None if game.start_sfen == STARTING_SFEN else board.copy())
    for m in _walk(board, game.moves):
        exp.move(m)
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
    """The game as CSA V2.2 text (names, start position, moves, ``%`` ending).

    Raises:
        RecordError: a move of the game is not legal.
    """
    exp = CSA.Exporter()
    exp.f = io.StringIO()
    board = _board(game)
    var_info = {k: str(v) for k, v in game.meta.items() if k in ("worker", "version", "detail") and str(v)}
    exp.info(board.copy(), [game.black, game.white], var_info=var_info or None, version="V2.2")
    for m in _walk(board, game.moves):
        exp.move(m)
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


#: export format -> (writer of one game's text, file extension, text encoding)
FORMATS = {"kif": (to_kif, ".kif", "cp932"), "csa": (to_csa, ".csa", "utf-8"), "usi": (to_usi, ".usi", "utf-8")}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def export_games(games: Iterable[Game], fmt: str, out_dir: str | Path) -> list[Path]:
    """Write each game to ``out_dir/{id}.{kif|csa}``, or all games to ``out_dir/games.usi``
    (``fmt`` is a key of :data:`FORMATS`; ``out_dir`` is created).

    Returns:
        the paths written.

    Raises:
        ValueError: unknown format; OSError: the files cannot be written.
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
    """The newest ``count`` games of the run's ``games`` stream, oldest first; a bad entry is
    skipped with a line on stderr.

    Raises:
        redis.RedisError: Redis unreachable.
    """
    return games_from_entries(status.read_stream(r, Keys(run).games, count))


def games_from_entries(entries: Iterable[tuple[str, dict]]) -> list[Game]:
    """:class:`Game` s of ``games`` stream entries ``(entry id, fields)`` (as
    :func:`keisei_stream.wire.status.read_stream` returns them), in order; the id becomes the
    game's id with ``-`` written ``_``; a bad entry is skipped with a line on stderr."""
    games = []
    for eid, fields in entries:
        try:
            games.append(game_from_fields(fields, eid.replace("-", "_")))
        except RecordError as exc:
            print(f"skipping games entry {eid}: {exc}", file=sys.stderr)
    return games


def game_from_archive_row(row: dict) -> Game:
    """:class:`Game` from one row of the run's game archive (:func:`keisei_stream.wire.archive.read_archive`):
    the same id (``-`` written ``_``), names and ``meta`` (``worker``, ``version``) as the
    ``games`` stream entry it was archived from (:func:`game_from_fields`).

    Raises:
        RecordError: as :func:`parse_game_fields` (bad reason, SFEN or move).
    """
    fields = {"start_sfen": row.get("start", "startpos"), "moves": row.get("moves", ""),
              "result": row.get("result", "0") or "0", "reason": row.get("reason", "NONE") or "NONE",
              "opening_plies": row.get("opening_plies", "0") or "0"}
    # empty worker/version columns mean the stream entry had no such field
    fields.update({k: row[k] for k in ("worker", "version") if row.get(k)})
    return game_from_fields(fields, str(row.get("id", "game")).replace("-", "_"))


def read_archive_games(directory: str | Path, count: Optional[int] = None, before: Optional[str] = None) -> list[Game]:
    """The newest ``count`` games (all when None) of a run's game archive (``runs/{run}/games``)
    older than the ``games`` stream entry id ``before`` (no bound when None), oldest first; a bad
    row is skipped with a line on stderr. An absent directory holds no games.

    Raises:
        OSError: a chunk cannot be read.
    """
    games = []
    for row in read_newest(directory, count, before):
        try:
            games.append(game_from_archive_row(row))
        except RecordError as exc:
            print(f"skipping archived game {row.get('id')}: {exc}", file=sys.stderr)
    return games


def read_eval_games(path: str | Path) -> list[Game]:
    """The games of a ``keisei eval --json`` file (its ``records``), in file order.

    Raises:
        OSError: unreadable file; ValueError: not JSON, or a record with a bad SFEN or an illegal
            move (:class:`RecordError`); KeyError/TypeError: not such a file.
    """
    data = json.loads(Path(path).read_text())
    return [game_from_eval(rec) for rec in data.get("records", [])]


# ------------------------------------------------------------------------------------------------
# positions and pictures


def board_after(game: Game, ply: Optional[int] = None) -> tuple[cshogi.Board, Optional[int], int]:
    """The position after the first ``ply`` moves of ``game``.

    Args:
        game: the game; ply: moves to play (default: all), clamped to ``0..game.plies``.

    Returns:
        ``(board, last_move, n)``: a new ``cshogi.Board``, the cshogi move code of the last move
        played (None at the start position) and the number of moves played.

    Raises:
        RecordError: a move of the game is not legal.
    """
    n = game.plies if ply is None else max(0, min(ply, game.plies))
    board = _board(game)
    last = None
    for last in _walk(board, game.moves[:n]):
        pass
    return board, last, n


def to_svg(game: Game, ply: Optional[int] = None) -> str:
    """SVG text of the board after ``ply`` moves (default: the end), the last move highlighted
    (``cshogi.Board.to_svg``)."""
    board, last, _ = board_after(game, ply)
    return str(board.to_svg(last) if last else board.to_svg())
