"""The USI protocol's arguments and the engine's clock: ``position`` (:func:`parse_position`), ``go``
(:class:`GoParams`, :func:`parse_go`), the time a move may take (:func:`time_budget_ms`) and the
search's limits for a ``go`` (:meth:`GoParams.search_limits`), the ``info`` line of a search
(:func:`info_line`) and its ``score cp`` scale (:func:`value_to_cp`). Protocol: USI
(http://shogidokoro.starfree.jp/usi.html, the USI 2.0 description).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import cshogi

from keisei_stream.play.engine.tree import SearchLimits, SearchResult
from keisei_stream.shogi import legal_move_from_usi, validate_sfen


def value_to_cp(v: float) -> int:
    """Value in [-1, 1] -> centipawns on the 600 logistic scale: ``p = (v + 1) / 2``,
    ``cp = 600 ln(p / (1 - p))`` (the usual 600-centipawn scale of shogi engines), clamped to
    +-30000; 0 for NaN."""
    if not math.isfinite(v):
        return 0
    p = min(max((v + 1.0) / 2.0, 1e-9), 1.0 - 1e-9)
    return int(max(-30000, min(30000, round(600.0 * math.log(p / (1.0 - p))))))


def info_line(res: SearchResult, ms: int) -> str:
    """The ``info depth D seldepth S nodes N nps X time MS [score cp C|mate M] pv ...`` line of a
    (partial) search result, ``ms`` milliseconds after ``go``. ``score mate`` when ``res.mate_in``
    is set, ``score cp`` (:func:`value_to_cp`) of a finite ``res.value``, no score for a move
    played without a value (the only legal move, not searched); depth at least 1, seldepth at
    least the depth."""
    if res.mate_in is not None:
        score = f" score mate {res.mate_in}"
    elif math.isfinite(res.value):
        score = f" score cp {value_to_cp(res.value)}"
    else:
        score = ""
    depth = max(1, res.depth)
    return (f"info depth {depth} seldepth {max(depth, res.seldepth)} nodes {res.nodes} "
            f"nps {int(res.nps)} time {ms}{score} pv {' '.join(res.pv)}")


def parse_position(tokens: list[str]) -> tuple[cshogi.Board, str, list[str], Optional[str]]:
    """``position`` arguments -> ``(board, start_sfen or "startpos", moves played, error or None)``.

    The board keeps the SFEN's move number (``board.move_number``: the move the side to move plays
    next, counted from the game's real start) and ends after the last legal move of the list; an
    illegal or malformed move stops the replay (its text is in the error). A malformed command or
    SFEN gives the start position and the error text; nothing is raised.
    """
    if not tokens:
        return cshogi.Board(), "startpos", [], "empty position command"
    if "moves" in tokens:
        i = tokens.index("moves")
        head, moves = tokens[:i], tokens[i + 1:]
    else:
        head, moves = tokens, []
    if not head:
        return cshogi.Board(), "startpos", [], f"bad position command {' '.join(tokens)!r}"
    if head[0] == "startpos":
        board, start = cshogi.Board(), "startpos"
    elif head[0] == "sfen" and len(head) >= 4:
        try:
            start = validate_sfen(" ".join(head[1:5]))
        except ValueError as exc:
            return cshogi.Board(), "startpos", [], str(exc)
        board = cshogi.Board()
        board.set_sfen(start)
        if not board.is_ok():
            return cshogi.Board(), "startpos", [], f"bad sfen {start!r}"
    else:
        return cshogi.Board(), "startpos", [], f"bad position command {' '.join(tokens)!r}"
    played: list[str] = []
    for mv in moves:
        try:
            board.push(legal_move_from_usi(board, mv))
        except ValueError:
            return board, start, played, f"illegal move {mv!r} after {len(played)} moves; position kept before it"
        played.append(mv)
    return board, start, played, None


# ------------------------------------------------------------------------------------------------
# go and the clock


def time_budget_ms(remaining: float, increment: float, byoyomi: float, move_number: int, margin: float) -> float:
    """Milliseconds to search for a move under a ``go btime/wtime/binc/winc/byoyomi`` clock.

    python-dlshogi2's rule (``mcts_player.py``, ``set_limits``): ``remaining / (14 + max(0, 30 -
    move_number)) + increment``, at least the byoyomi, then never more than what can be spent
    without losing: ``remaining + byoyomi - margin`` (the increment is only credited after the
    move). The margin (``ByoyomiMargin``) covers the time between our ``bestmove`` and the
    GUI's clock (pipes, the process being descheduled); when it is more than half of the time
    that may be spent it is cut to half (a 100 ms byoyomi leaves 50 ms to search, not none).

    Args:
        remaining: the side to move's remaining main time (ms, >= 0).
        increment: its increment per move (ms, >= 0; Fischer).
        byoyomi: byoyomi (ms, >= 0).
        move_number: the move being played (1 = the game's first).
        margin: ms kept back (>= 0).

    Returns:
        the budget in ms (>= 0; 0 means: play the network's move without search).
    """
    remaining, increment, byoyomi = max(0.0, remaining), max(0.0, increment), max(0.0, byoyomi)
    available = remaining + byoyomi
    keep = min(max(0.0, margin), available / 2.0)
    hard = available - keep
    target = remaining / (14 + max(0, 30 - int(move_number))) + increment
    if byoyomi > 0:
        target = max(target, byoyomi - keep)
    return max(0.0, min(target, hard))


@dataclass
class GoParams:
    """A parsed ``go`` command (times in ms; None = not given)."""

    ponder: bool = False
    infinite: bool = False
    btime: Optional[int] = None
    wtime: Optional[int] = None
    binc: Optional[int] = None
    winc: Optional[int] = None
    byoyomi: Optional[int] = None
    movetime: Optional[int] = None
    nodes: Optional[int] = None
    depth: Optional[int] = None

    def timed(self) -> bool:
        """A clock or a move time was given."""
        return any(x is not None for x in (self.btime, self.wtime, self.binc, self.winc, self.byoyomi, self.movetime))

    def budget_ms(self, turn: int, move_number: int, margin: float) -> Optional[float]:
        """The time budget (:func:`time_budget_ms`) for the side ``turn`` (``cshogi.BLACK`` /
        ``WHITE``) to play move ``move_number``, keeping ``margin`` ms; None without a clock."""
        if self.movetime is not None:
            return time_budget_ms(0, 0, self.movetime, 1 << 20, margin)
        if not self.timed():
            return None
        black = turn == cshogi.BLACK
        remaining = (self.btime if black else self.wtime) or 0
        inc = (self.binc if black else self.winc) or 0
        return time_budget_ms(remaining, inc, self.byoyomi or 0, move_number, margin)

    def search_limits(self, turn: int, move_number: int, t_start: float, margin: float,
                      default_nodes: int) -> SearchLimits:
        """The search's limits for this ``go`` with its clock starting at ``t_start``
        (``time.perf_counter()`` seconds): ``nodes`` as given, or ``default_nodes`` (the option
        ``Nodes``) when neither ``nodes`` nor a clock is given; the deadline ``t_start`` plus the
        budget (:meth:`budget_ms`, keeping ``margin`` ms), None without a clock."""
        budget = self.budget_ms(turn, move_number, margin)
        nodes = self.nodes
        if nodes is None and budget is None:
            nodes = default_nodes
        return SearchLimits(nodes, None if budget is None else t_start + budget / 1000.0)


_GO_INT = ("btime", "wtime", "binc", "winc", "byoyomi", "movetime", "nodes", "depth")


def parse_go(args: list[str]) -> tuple[GoParams, list[str]]:
    """``go`` arguments -> ``(GoParams, problems)``; a malformed or negative number is left out
    and described in ``problems`` (the engine says so in ``info string``)."""
    g = GoParams()
    problems = []
    i = 0
    while i < len(args):
        t = args[i]
        if t in ("ponder", "infinite"):
            setattr(g, t, True)
            i += 1
        elif t in _GO_INT:
            v = args[i + 1] if i + 1 < len(args) else None
            try:
                n = int(v)  # type: ignore[arg-type]
                if n < 0:
                    raise ValueError
                setattr(g, t, n)
            except (TypeError, ValueError):
                problems.append(f"go: bad {t} value {v!r}, ignored")
            i += 2
        else:
            problems.append(f"go: unknown argument {t!r}, ignored")
            i += 1
    return g, problems
