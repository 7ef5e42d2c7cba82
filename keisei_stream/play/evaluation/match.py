"""Matches between players, judged by the referee, scored with Elo.

**One game** (:func:`play_game`): the referee (:func:`keisei_stream.shogi.judge`, the same rules
as self-play, in the same order: checkmate, 4-fold repetition or perpetual check, entering-king
declaration by the CSA 27-point rule, the move limit) judges the position after every move; this
module adds what only a match between players sees, the players' own failures:

- a move that is not legal in the position (:func:`keisei_stream.shogi.legal_move_from_usi`), or
  an unparseable answer: the mover loses (``illegal``). ``"resign"``: the
  mover loses (``resign``). ``"win"`` (USI entering-king declaration): a win when
  :func:`keisei_stream.shogi.can_declare` holds, else a loss (``illegal``; the referee declares
  for every player as soon as it is possible, so a valid ``win`` only comes late). A player that
  raises :class:`keisei_stream.play.players.PlayerError` loses with its reason (``timeout``: no
  answer in time, the engine is killed; ``crash``: the engine died).
- the referee's endings: ``checkmate`` (the mover wins), ``repetition`` (draw),
  ``perpetual_check`` (the checking side loses), ``entering_king`` (the side to move wins),
  ``max_plies`` (``max_plies`` moves played, random opening included: a draw).

**A match** (:func:`play_match`): ``games`` games, colours alternate (game ``i`` even: player A
is Black). With ``opening_plies = k > 0`` both games of a pair (``2j``, ``2j + 1``) start after
the same k uniformly random legal plies (seeded by ``seed`` and ``j``). Games run in
``processes`` worker processes (multiprocessing, ``spawn`` by default); each worker builds its
players from the spec strings once (:func:`keisei_stream.play.evaluation.specs.make_player`), so no live
object crosses a process boundary. Per-game seeds derive from ``(seed, game index)``, so a
match's results do not depend on the number of processes.

Continuous evaluation of a run (``keisei eval --follow``) is in
:mod:`keisei_stream.play.evaluation.follow`.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing import util as mp_util
from typing import Optional, Sequence

import cshogi
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from keisei_stream.play.evaluation import elo as elo_math
from keisei_stream.play.evaluation.specs import make_player, parse_spec
from keisei_stream.play.players import STARTPOS, Player, PlayerError
from keisei_stream.shogi import (
    EndReason, RepetitionTracker, can_declare, judge, legal_move_from_usi, validate_sfen,
)
from keisei_stream.shogi import random_opening as referee_opening

#: Reasons a game ends (labels in records), derived from EndReason: ``timeout``/``crash``/``illegal``/
#: ``resign`` are losses of the player concerned.
REASONS = tuple(r.label for r in EndReason if r != EndReason.NONE)


# ------------------------------------------------------------------------------------------------
# one game


def random_opening(plies: int, seed: int, start_sfen: str = STARTPOS, max_tries: int = 100) -> list[str]:
    """``plies`` uniformly random legal moves (USI) from ``start_sfen``, ending in a position where
    the game goes on (legal moves, no repetition, no entering-king declaration).

    Args:
        plies: opening length (>= 0); seed: seed of the move choice; start_sfen: ``"startpos"``
            or a valid SFEN; max_tries: openings drawn before giving up.

    Returns:
        ``plies`` USI move strings.

    Raises:
        ValueError: if no such opening is found in ``max_tries`` attempts.
    """
    board = cshogi.Board()
    moves, _, _ = referee_opening(board, plies, np.random.default_rng(seed),
                                   None if start_sfen == STARTPOS else start_sfen, max_tries)
    return [cshogi.move_to_usi(m) for m in moves]


def _opp(color: int) -> int:
    return 1 - color


def _failure(exc: PlayerError) -> EndReason:
    """A player's failure as an end reason (``timeout``, ``illegal``; anything else is a crash)."""
    try:
        reason = EndReason.from_label(exc.reason)
    except ValueError:
        return EndReason.CRASH
    return reason if reason in (EndReason.ILLEGAL, EndReason.TIMEOUT, EndReason.CRASH) else EndReason.CRASH


def _choice_to_move(board: cshogi.Board, side: int, choice) -> tuple[int, Optional[tuple]]:
    """The move a player's ``choice`` (a cshogi move code or a USI string) plays in ``board``:
    ``(move, None)``, or ``(0, (winner, reason, detail))`` when the choice ends the game
    (``resign``, a ``win`` declaration, an illegal or unparseable move)."""
    if choice == "resign":
        return 0, (_opp(side), EndReason.RESIGN, "")
    if choice == "win":  # the referee declares as soon as it is possible, so this is late
        if can_declare(board):
            return 0, (side, EndReason.ENTERING_KING, "")
        return 0, (_opp(side), EndReason.ILLEGAL, "entering-king declaration not valid")
    usi = choice if isinstance(choice, str) else cshogi.move_to_usi(int(choice)) if choice else str(choice)
    try:
        return legal_move_from_usi(board, usi), None
    except ValueError:
        return 0, (_opp(side), EndReason.ILLEGAL, f"illegal move {usi!r}")


def _start_board(start_sfen: str, opening: Sequence[str]) -> tuple[cshogi.Board, RepetitionTracker]:
    """The board after ``opening`` from ``start_sfen`` (``"startpos"`` or a SFEN that
    :func:`play_game` has validated), and the positions counted so far.

    Raises:
        ValueError: an illegal opening move.
    """
    board = cshogi.Board() if start_sfen == STARTPOS else cshogi.Board(start_sfen)
    tracker = RepetitionTracker(board)
    for mv in opening:
        try:
            board.push(legal_move_from_usi(board, mv))
        except ValueError:
            raise ValueError(f"opening move {mv!r} is not legal") from None
        tracker.push(board)
    return board, tracker


def play_game(black: Player, white: Player, *, max_plies: int = 256, start_sfen: str = STARTPOS,
              opening: Sequence[str] = (), seeds: tuple[Optional[int], Optional[int]] = (None, None)) -> dict:
    """Play one game between two players, the referee judging every move and the ending.

    Args:
        black, white: :class:`keisei_stream.play.players.Player` objects.
        max_plies: the game is a draw once this many plies have been played (opening included).
        start_sfen: ``"startpos"`` or a SFEN.
        opening: USI moves played before the players take over (must be legal).
        seeds: per-player seeds passed to ``new_game``.

    Raises:
        ValueError: malformed ``start_sfen`` or an illegal opening move.

    Returns:
        dict: ``start_sfen``, ``opening_plies``, ``moves`` (list of USI), ``plies``, ``result``
        (+1 Black won, -1 White won, 0 draw), ``winner`` (``"black"|"white"|None``), ``reason``
        (one of :data:`REASONS`), ``detail`` (text, e.g. the illegal move or the engine error).
    """
    if start_sfen != STARTPOS:
        start_sfen = validate_sfen(start_sfen)  # cshogi aborts on some malformed SFENs
    board, tracker = _start_board(start_sfen, opening)
    moves: list[str] = list(opening)
    players = (black, white)
    ended: Optional[tuple] = None  # (winner, reason, detail) of a player's failure
    for color, (p, s) in enumerate(zip(players, seeds)):
        try:
            p.new_game(start_sfen, list(opening), s)
        except PlayerError as exc:  # an engine that cannot start (or hangs at start) loses
            ended = ended or (_opp(color), _failure(exc), exc.message)
    verdict = judge(board, tracker.count(board), len(moves), max_plies)
    while ended is None and not verdict:
        side = board.turn
        try:
            m, ended = _choice_to_move(board, side, players[side].choose(board, len(moves)))
        except PlayerError as exc:
            ended = (_opp(side), _failure(exc), exc.message)
        if ended is not None:
            break
        board.push(m)
        moves.append(cshogi.move_to_usi(m))
        verdict = judge(board, tracker.push(board), len(moves), max_plies)
    winner, reason, detail = ended or (verdict.winner(board.turn), verdict.reason, "")
    result = 0 if winner is None else (1 if winner == cshogi.BLACK else -1)
    for color, p in enumerate(players):
        go = getattr(p, "game_over", None)
        if go is not None:
            go("draw" if winner is None else ("win" if winner == color else "lose"))
    return {
        "start_sfen": start_sfen, "opening_plies": len(opening), "moves": moves, "plies": len(moves),
        "result": result, "winner": None if winner is None else ("black" if winner == cshogi.BLACK else "white"),
        "reason": reason.label, "detail": detail,
    }


# ------------------------------------------------------------------------------------------------
# a match


@dataclass
class MatchResult:
    """Result of :func:`play_match`, from player A's point of view.

    ``estimate``: the :class:`keisei_stream.play.evaluation.elo.EloEstimate` of A minus B from A's wins,
    losses and draws; its numbers are also attributes of the result (``games``, ``wins``,
    ``losses``, ``draws``, ``score`` in [0, 1], ``elo`` with its 95 % interval ``elo_lo`` /
    ``elo_hi`` (Elo points; bounds may be +-inf at a 0 %/100 % score), ``los`` in [0, 1]);
    ``reasons``: count of each end reason; ``records``: one dict per game (:func:`play_game`'s
    fields plus ``game``, ``a_color``, ``black``, ``white``, ``a_result`` in {+1, 0, -1});
    ``seconds``: wall time.
    """

    player_a: str
    player_b: str
    name_a: str
    name_b: str
    estimate: elo_math.EloEstimate
    reasons: dict
    opening_plies: int
    max_plies: int
    seed: int
    seconds: float
    records: list = field(default_factory=list)

    games = property(lambda self: self.estimate.games, doc="games played")
    wins = property(lambda self: self.estimate.wins, doc="A's wins")
    losses = property(lambda self: self.estimate.losses, doc="A's losses")
    draws = property(lambda self: self.estimate.draws, doc="draws")
    score = property(lambda self: self.estimate.score, doc="A's score in [0, 1]")
    elo = property(lambda self: self.estimate.elo, doc="Elo of A minus B (finite)")
    elo_lo = property(lambda self: self.estimate.elo_lo, doc="low end of the 95 % interval (may be -inf)")
    elo_hi = property(lambda self: self.estimate.elo_hi, doc="high end of the 95 % interval (may be +inf)")
    los = property(lambda self: self.estimate.los, doc="likelihood of superiority of A, in [0, 1]")

    def summary(self) -> str:
        """One line: ``A vs B: W-L-D (score ..%), Elo +x [lo, hi] (+-m), LOS ..%; reasons; seconds``."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        return elo_math.format_summary(self.name_a, self.name_b, self.estimate) + f"; {reasons}; {self.seconds:.1f} s"

    def to_dict(self, with_records: bool = True) -> dict:
        """JSON-safe flat dict (infinite values as ``None``): ``player_a``, ``player_b``, ``name_a``,
        ``name_b``, ``games``, ``wins``, ``losses``, ``draws``, ``score``, ``elo``, ``elo_lo``,
        ``elo_hi``, ``elo_ci95`` (half the interval's width, the "+-"), ``los``, ``bounded``,
        ``reasons``, ``opening_plies``, ``max_plies``, ``seed``, ``seconds`` and ``records``
        (unless ``with_records`` is False)."""
        e = self.estimate
        d = {"player_a": self.player_a, "player_b": self.player_b, "name_a": self.name_a, "name_b": self.name_b,
             "games": e.games, "wins": e.wins, "losses": e.losses, "draws": e.draws, "score": e.score,
             "elo": e.elo, "elo_lo": e.elo_lo, "elo_hi": e.elo_hi, "elo_ci95": e.elo_margin, "los": e.los,
             "bounded": e.bounded, "reasons": dict(self.reasons), "opening_plies": self.opening_plies,
             "max_plies": self.max_plies, "seed": self.seed, "seconds": self.seconds}
        if with_records:
            d["records"] = copy.deepcopy(self.records)
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


# worker-process state: players built once per process from the spec strings
_WORKER: dict = {}


def _close_worker_players() -> None:
    _WORKER.pop("key", None)
    for p in _WORKER.pop("players", ()):
        try:
            p.close()
        except Exception:  # one player failing to close must not keep the other open
            pass


def _worker_players(spec_a: str, spec_b: str, seed: int, temperature: float, device: str) -> tuple:
    key = (spec_a, spec_b, seed, temperature, device)
    if _WORKER.get("key") != key:
        _close_worker_players()
        pa = make_player(spec_a, seed=seed, temperature=temperature, device=device)
        pb = make_player(spec_b, seed=seed + 1, temperature=temperature, device=device)
        _WORKER["players"] = (pa, pb)
        _WORKER["key"] = key
        if mp.parent_process() is not None:
            mp_util.Finalize(None, _close_worker_players, exitpriority=10)
    return _WORKER["players"]


def _play_indexed(task: tuple) -> dict:
    """Play game ``i`` of a match (runs in a worker process, or in-process)."""
    (i, spec_a, spec_b, seed, temperature, device, opening_plies, max_plies) = task
    pa, pb = _worker_players(spec_a, spec_b, seed, temperature, device)
    opening = random_opening(opening_plies, _seed_of(seed, i // 2, 17)) if opening_plies > 0 else []
    a_black = i % 2 == 0
    black, white = (pa, pb) if a_black else (pb, pa)
    seeds = (_seed_of(seed, i, 1), _seed_of(seed, i, 2))
    rec = play_game(black, white, max_plies=max_plies, opening=opening, seeds=seeds)
    a_sign = 1 if a_black else -1
    rec.update(game=i, a_color="black" if a_black else "white", black=black.name, white=white.name,
               a_result=rec["result"] * a_sign)
    return rec


def play_match(player_a: str, player_b: str, games: int = 100, opening_plies: int = 0, processes: int = 1,
               max_plies: int = 256, seed: int = 0, *, temperature: float = 0.0, device: str = "cpu",
               progress: bool = True, start_method: str = "spawn", on_game=None) -> MatchResult:
    """Play ``games`` games between two player specs and score them for player A.

    Args:
        player_a, player_b: spec strings (:mod:`keisei_stream.play.evaluation.specs`).
        games: number of games (>= 1); colours alternate, A is Black in even games.
        opening_plies: random plies before the players move (same opening for both games of a pair).
        processes: worker processes (1 = play in this process).
        max_plies: draw after this many plies.
        seed: base seed (openings, random players, sampling).
        temperature, device: defaults for model players.
        progress: show a rich progress bar (on stderr).
        start_method: multiprocessing start method (``spawn`` is safe with CUDA and threads).
        on_game: optional callback ``f(record)`` called in this process after each game.

    Returns:
        :class:`MatchResult`.

    Raises:
        SpecError: a bad spec (raised before any game when the spec does not parse; a model that
            fails to load raises from the first game).
        ValueError: ``games < 1`` or ``processes < 1``.
    """
    if games < 1 or processes < 1 or max_plies < 1 or opening_plies < 0:
        raise ValueError("games, processes, max_plies must be >= 1 and opening_plies >= 0")
    parse_spec(player_a)
    parse_spec(player_b)
    tasks = [(i, player_a, player_b, seed, temperature, device, opening_plies, max_plies) for i in range(games)]
    records: list[dict] = []
    t0 = time.monotonic()
    w = l = d = 0
    console = Console(stderr=True)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("W {task.fields[w]} L {task.fields[l]} D {task.fields[d]}"),
                   TimeElapsedColumn(), console=console, disable=not progress, transient=False)

    def consume(results) -> None:
        nonlocal w, l, d
        with bar:
            tid = bar.add_task(f"{player_a[:30]} vs {player_b[:30]}", total=games, w=0, l=0, d=0)
            for rec in results:
                records.append(rec)
                w += rec["a_result"] > 0
                l += rec["a_result"] < 0
                d += rec["a_result"] == 0
                bar.update(tid, advance=1, w=w, l=l, d=d)
                if on_game is not None:
                    on_game(rec)

    if processes == 1:
        try:
            consume(_play_indexed(t) for t in tasks)
        finally:
            _close_worker_players()
    else:
        ctx = mp.get_context(start_method)
        with ctx.Pool(min(processes, games)) as pool:
            consume(pool.imap_unordered(_play_indexed, tasks, chunksize=1))
            pool.close()
            pool.join()
    records.sort(key=lambda r: r["game"])
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    first = records[0]
    name_a = first["black"] if first["a_color"] == "black" else first["white"]
    name_b = first["white"] if first["a_color"] == "black" else first["black"]
    return MatchResult(
        player_a=player_a, player_b=player_b, name_a=name_a, name_b=name_b, estimate=elo_math.estimate(w, l, d),
        reasons=reasons, opening_plies=opening_plies, max_plies=max_plies, seed=seed,
        seconds=time.monotonic() - t0, records=records,
    )
