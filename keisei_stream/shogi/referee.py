"""The referee: the one place that says whether, why and for whom a game of shogi ended.

Everything that judges a game uses this module: :class:`~keisei_stream.shogi.env.VecEnv` (self-play),
``keisei_stream.play.evaluation.match.play_game`` (matches), ``keisei_stream.wire.replay.replay_check``
(the learner's replay of recorded games) and the tree search of ``keisei_stream.play.engine`` (its
terminal nodes and root). cshogi supplies every rule; this module fixes which rules apply and in
which order. :func:`legal_move_from_usi` is the one way a USI move text from outside (a USI
``position`` command, an engine's ``bestmove``, a game record) becomes a move.

**End reasons** (:class:`EndReason`, ``uint8`` on the wire): one vocabulary. The integer codes
are the wire format; :attr:`EndReason.label` gives the lower-case names used in evaluation
records and exports (``"checkmate"``, ``"repetition"``, ``"perpetual_check"``,
``"entering_king"``, ``"max_plies"``, ``"illegal"``, ``"resign"``, ``"timeout"``, ``"crash"``,
``"unknown"`` for ``NONE``) and :meth:`EndReason.from_label` reads a label, a member name (any
case) or a decimal code back. :data:`BOARD_END_REASONS` are the ones :func:`judge` gives (the only
ones in self-play); ``ILLEGAL``, ``RESIGN``, ``TIMEOUT`` and ``CRASH`` are player failures
that only a match referee sees (the player concerned loses).

**The rules** (:func:`judge`), applied to the position *after a move*, in this order (the order
matters: a move can satisfy several):

1. no legal move for the side to move -> ``CHECKMATE``, the player who just moved wins. cshogi
   never generates a pawn-drop mate (uchifuzume), so a legal move cannot give one; stalemate does
   not occur in shogi (drops), so "no legal move" is mate.
2. the position occurs for the 4th time in the game (sennichite, CSA rules; positions compared by
   cshogi's Zobrist key, which includes the pieces in hand and the side to move; counted by a
   :class:`RepetitionTracker`) -> ``cshogi.Board.is_draw()`` says whether one side gave check on
   every move since the previous occurrence: ``REPETITION_WIN`` (the side to move was checked
   throughout) -> ``PERPETUAL_CHECK``, the side to move wins; ``REPETITION_LOSE`` (the side to
   move gave the checks) -> ``PERPETUAL_CHECK``, the side to move loses (CSA: perpetual check
   loses for the checking side); any other answer -> ``REPETITION_DRAW``, a draw. ``is_draw``
   alone fires at the first repetition (a search rule), hence the 4-fold count kept here.
3. the side to move can declare an entering-king win (:func:`can_declare`:
   ``cshogi.Board.is_nyugyoku()`` with its default ``LAW_27``, the CSA 27-point rule: the
   declaring side is to move, its king is in the enemy camp (the far three ranks) and not in check,
   at least 10 of its other pieces are in the camp, and its pieces in the camp plus in hand count
   at least 28 points for Black, 27 for White, a rook or bishop (promoted or not) 5 points and any
   other piece 1) -> ``ENTERING_KING``, the side to move wins. The referee declares on every
   player's behalf, as soon as it is possible. (cshogi's 24-point rule, ``LAW_24``, is not used.)
4. ``ply >= max_plies`` (plies counted from the game's real start, random opening included) ->
   ``MAX_PLIES``, a draw.

:func:`judge` returns a :class:`Verdict`: the reason (``EndReason.NONE`` while the game goes on;
the verdict is then falsy) and ``mover_score``, +1 / -1 / 0 for the player who made the last move
(the self-play reward). ``verdict.winner(board.turn)`` gives the winner's colour (or ``None``)
and ``verdict.result(board.turn)`` the game result (+1 Black won, -1 White won, 0 draw).

**Random openings** (:func:`random_opening`): k uniformly random legal moves from a start
position, retried until no position of the opening ended the game and the last one has a legal
move. VecEnv and evaluation draw from their own ``numpy.random.Generator``; one draw of
``rng.integers(len(legal))`` per ply, over cshogi's legal-move order, exactly as VecEnv always
did, so seeded self-play is unchanged. (Before this module VecEnv tested the declaration only
in an opening's last position and evaluation rejected any repetition of its last position; an
opening is now rejected exactly when the game would have ended during it.)

How each caller uses it
-----------------------

*Self-play* (``VecEnv.step``)::

    board.push(move)
    legal = list(board.legal_moves)                     # needed for the next mask anyway
    count = tracker.push(board)                         # occurrences, this one included
    verdict = judge(board, count, ply, max_plies, bool(legal))
    if verdict.reason:                                  # reward = verdict.mover_score
        record(result=verdict.result(board.turn), reason=verdict.reason)

*A match* (``play_game``): count the start and opening positions, judge the position the players
start from (it may already be over), then judge after every move; a player's own failure
(illegal move, ``resign``, timeout, crash, a ``win`` declaration when :func:`can_declare` is false)
ends the game outside :func:`judge` with ``EndReason.ILLEGAL/RESIGN/TIMEOUT/CRASH``::

    tracker = RepetitionTracker(board)                  # counts the start position
    for m in opening:
        board.push(m); tracker.push(board)
    verdict = judge(board, tracker.count(board), len(moves), max_plies)
    while not verdict:
        ... the side to move chooses; its failures end the game here ...
        board.push(m); moves.append(usi)
        verdict = judge(board, tracker.push(board), len(moves), max_plies)
    winner, reason = verdict.winner(board.turn), verdict.reason

*A replay* (``replay_check``): replay the recorded moves, judging after each; the game must not
end before its last move, and the recorded reason and result must be what the referee says
after it. For a game recorded from a later ply, occurrences before its first position are
unknown (the tracker undercounts), so a recorded repetition end may be judged as the next rule in
the order (``ENTERING_KING``, ``MAX_PLIES`` or ``NONE``); every other judgement is exact::

    tracker, count = RepetitionTracker(board), 1
    verdict = judge(board, count, ply0, max_plies)      # the first recorded position
    for each recorded move (position t, ply[t]):
        if verdict.reason: raise BadEntry("the game had already ended")
        recorded repetition[t] == repetition_feature(count)   # plane 44 (exact from ply 0)
        board.push(move)
        count = tracker.push(board)
        verdict = judge(board, count, ply[t] + 1, max_plies)
    ok = (verdict.reason, verdict.result(board.turn)) == (recorded reason, recorded result)

In hot loops test ``verdict.reason`` (an ``IntEnum``, 0 while the game goes on) rather than the
verdict itself (``Verdict.__bool__`` is a Python call).

No torch, no redis.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import cshogi
import numpy as np

STARTING_SFEN = cshogi.STARTING_SFEN


# ------------------------------------------------------------------------------------------------
# end reasons


class EndReason(enum.IntEnum):
    """Why a game ended: ``uint8`` on the wire, do not renumber.

    1-5 are judged from the board (:func:`judge`, :data:`BOARD_END_REASONS`); 6-9 are player
    failures seen only by a match referee. ``label`` / ``from_label`` convert to and from the
    lower-case names of records and exports.
    """

    NONE = 0
    CHECKMATE = 1
    REPETITION_DRAW = 2
    PERPETUAL_CHECK = 3
    ENTERING_KING = 4
    MAX_PLIES = 5
    ILLEGAL = 6
    RESIGN = 7
    TIMEOUT = 8
    CRASH = 9

    @property
    def label(self) -> str:
        """Lower-case name used in records and exports (``REPETITION_DRAW`` -> ``"repetition"``,
        ``NONE`` -> ``"unknown"``, otherwise the member name in lower case)."""
        return _LABELS[self]

    @classmethod
    def from_label(cls, text: str) -> EndReason:
        """The reason named by ``text``: a :attr:`label` (``"repetition"``), a member name in any
        case (``"REPETITION_DRAW"``, ``"repetition_draw"``) or a decimal code (``"2"``);
        surrounding whitespace is ignored.

        Raises:
            ValueError: anything else.
        """
        key = str(text).strip()
        if key.isdigit():
            return cls(int(key))
        key = key.lower()
        found = _FROM_LABEL.get(key)
        if found is None:
            found = cls.__members__.get(key.upper())
        if found is None:
            raise ValueError(f"unknown end reason {text!r}")
        return found


_LABELS = {r: r.name.lower() for r in EndReason}
_LABELS[EndReason.NONE] = "unknown"
_LABELS[EndReason.REPETITION_DRAW] = "repetition"
_FROM_LABEL = {label: r for r, label in _LABELS.items()}

#: The reasons :func:`judge` gives, in the order it checks them (the only ones in self-play).
BOARD_END_REASONS = (EndReason.CHECKMATE, EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK,
                     EndReason.ENTERING_KING, EndReason.MAX_PLIES)


# ------------------------------------------------------------------------------------------------
# verdicts


@dataclass(frozen=True, slots=True)
class Verdict:
    """The referee's judgement of a position after a move.

    Attributes:
        reason: why the game ended; ``EndReason.NONE`` while it goes on (the verdict is then falsy).
        mover_score: for the player who made the last move: +1 won, -1 lost, 0 draw or not ended
            (the self-play reward).
    """

    reason: EndReason
    mover_score: int

    def __bool__(self) -> bool:
        return self.reason != EndReason.NONE

    def winner(self, turn: int) -> int | None:
        """Colour of the winner (``cshogi.BLACK`` 0 / ``cshogi.WHITE`` 1), ``None`` for a draw or
        no end; ``turn`` is the colour to move in the judged position (``board.turn``)."""
        if self.mover_score == 0:
            return None
        return 1 - turn if self.mover_score > 0 else turn

    def result(self, turn: int) -> int:
        """Game result: +1 Black won, -1 White won, 0 draw or no end; ``turn`` as in :meth:`winner`."""
        return self.mover_score if turn == cshogi.WHITE else -self.mover_score


#: The verdict while the game goes on.
ONGOING = Verdict(EndReason.NONE, 0)
_MATE = Verdict(EndReason.CHECKMATE, 1)
_PERPETUAL_BY_MOVER = Verdict(EndReason.PERPETUAL_CHECK, -1)      # the last mover gave the checks
_PERPETUAL_BY_TO_MOVE = Verdict(EndReason.PERPETUAL_CHECK, 1)     # the side to move gave them
_REPETITION = Verdict(EndReason.REPETITION_DRAW, 0)
_DECLARATION = Verdict(EndReason.ENTERING_KING, -1)               # the side to move declares
_MAX_PLIES = Verdict(EndReason.MAX_PLIES, 0)
_REPETITION_WIN, _REPETITION_LOSE = cshogi.REPETITION_WIN, cshogi.REPETITION_LOSE

#: For each reason :func:`judge` gives, the scores the player who made the last move can have
#: (+1 won, -1 lost, 0 draw): the one table a recorded result is checked against.
MOVER_SCORES: dict[EndReason, tuple[int, ...]] = {}
for _v in (_MATE, _PERPETUAL_BY_MOVER, _PERPETUAL_BY_TO_MOVE, _REPETITION, _DECLARATION, _MAX_PLIES):
    MOVER_SCORES[_v.reason] = tuple(sorted({*MOVER_SCORES.get(_v.reason, ()), _v.mover_score}))
del _v


def can_declare(board: cshogi.Board) -> bool:
    """Whether the side to move can declare an entering-king win (CSA 27-point rule, cshogi's
    ``is_nyugyoku()``; module docstring, rule 3). Also what a USI ``bestmove win`` is checked
    against."""
    return board.is_nyugyoku()


def legal_move_from_usi(board: cshogi.Board, usi: str) -> int:
    """The cshogi move code of the USI move text ``usi`` (``7g7f``, ``8h2b+``, ``P*5e``) when it is
    one of the legal moves of the side to move in ``board``'s position (the code cshogi's move
    generator gives, moved and captured piece included).

    Membership in ``board.legal_moves`` is the test, not ``board.is_legal``: cshogi 1.1's
    ``is_legal`` accepts a promotion outside the promotion zone (``2g2f+`` at the start).

    Raises:
        ValueError: ``usi`` is not a legal move in this position (malformed text, a square without
            the side to move's piece, a piece it does not hold, a move that leaves the king in
            check, nifu, pawn-drop mate, a promotion it may not make...).
    """
    try:
        move = board.move_from_usi(usi) if isinstance(usi, str) else 0
    except Exception:  # cshogi raises on some non-ASCII text; any failure is "not a move"
        move = 0
    if move:
        m16 = move & 0xFFFF
        for legal in board.legal_moves:
            if legal & 0xFFFF == m16:
                return legal
    raise ValueError(f"{usi!r} is not a legal move in this position")


def judge(board: cshogi.Board, repetitions: int, ply: int, max_plies: int,
          has_legal_move: bool | None = None) -> Verdict:
    """Judge ``board``, the position after a move (or a game's starting position).

    Rules and their order in the module docstring: checkmate, 4-fold repetition (perpetual check
    or draw), entering-king declaration, max plies.

    Args:
        board: the position; its move history must reach back over the last repetition cycle for
            perpetual check to be told from a draw (``Board.is_draw()`` reads it).
        repetitions: occurrences of this position in the game so far, this one included
            (:meth:`RepetitionTracker.push`'s return value); >= 4 ends the game.
        ply: plies played since the game's real start (random opening included).
        max_plies: the game is a draw once ``ply >= max_plies`` (if nothing else ended it).
        has_legal_move: whether the side to move has a legal move, when the caller already knows
            (saves a move generation); computed when ``None``.

    Returns:
        :class:`Verdict`; :data:`ONGOING` (falsy) when the game goes on.
    """
    if has_legal_move is None:
        has_legal_move = not board.is_game_over()
    if not has_legal_move:
        return _MATE
    if repetitions >= 4:
        d = board.is_draw()
        if d == _REPETITION_WIN:
            return _PERPETUAL_BY_MOVER
        if d == _REPETITION_LOSE:
            return _PERPETUAL_BY_TO_MOVE
        return _REPETITION
    if board.is_nyugyoku():
        return _DECLARATION
    if ply >= max_plies:
        return _MAX_PLIES
    return ONGOING


# ------------------------------------------------------------------------------------------------
# repetitions


def repetition_feature(count):
    """Observation plane 44's value x 3 for a position seen ``count`` times (this one included):
    its earlier occurrences, capped at 2 -> 0, 1 or 2 (the plane holds 0, 1/3, 2/3).

    ``count``: an ``int`` (-> ``int``) or an integer array ``(N,)`` (-> ``(N,)`` of its dtype).
    """
    if isinstance(count, np.ndarray):
        return np.minimum(count - 1, 2)
    return count - 1 if count < 3 else 2


class RepetitionTracker:
    """Occurrences of each position in one game, keyed by cshogi's Zobrist key (board, pieces in
    hand, side to move).

    Args:
        board: when given, its current position is counted once (a game's start).
    """

    __slots__ = ("counts",)

    def __init__(self, board: cshogi.Board | None = None):
        #: ``{zobrist key: occurrences}``
        self.counts: dict[int, int] = {} if board is None else {board.zobrist_hash(): 1}

    def push(self, board: cshogi.Board) -> int:
        """Count ``board``'s current position once more; returns its occurrences, this one included."""
        key = board.zobrist_hash()
        c = self.counts.get(key, 0) + 1
        self.counts[key] = c
        return c

    def pop(self, board: cshogi.Board) -> None:
        """Undo the :meth:`push` of ``board``'s current position (call before ``board.pop()``;
        for searches that push and pop moves)."""
        key = board.zobrist_hash()
        c = self.counts[key] - 1
        if c:
            self.counts[key] = c
        else:
            del self.counts[key]

    def count(self, board: cshogi.Board) -> int:
        """Occurrences of ``board``'s current position so far (0 if never pushed)."""
        return self.counts.get(board.zobrist_hash(), 0)

    def feature(self, board: cshogi.Board) -> int:
        """:func:`repetition_feature` of ``board``'s current position (which must have been counted)."""
        return repetition_feature(self.counts[board.zobrist_hash()])

    def __len__(self) -> int:
        """Distinct positions counted."""
        return len(self.counts)

    def __repr__(self) -> str:
        return f"RepetitionTracker({len(self.counts)} positions, max {max(self.counts.values(), default=0)})"


# ------------------------------------------------------------------------------------------------
# random openings


def random_opening(board: cshogi.Board, plies: int, rng: np.random.Generator, start_sfen: str | None = None,
                   max_tries: int = 10_000) -> tuple[list[int], RepetitionTracker, list[int]]:
    """Set ``board`` to ``start_sfen`` (``None``: the initial position) and play ``plies``
    uniformly random legal moves, retrying until the game goes on after them.

    Each ply draws ``rng.integers(len(legal))`` once and plays that index of cshogi's legal-move
    list; an attempt whose side to move has no legal move stops there (no further draws), and
    any other attempt plays all ``plies`` moves before it is judged. An attempt is kept when
    :func:`judge` ended the game at none of its positions (its plies counted from the start;
    ``max_plies`` not applied) and its last position has a legal move.

    Args:
        board: set and played on in place; on return it holds the opening's last position, with
            the opening as its move history.
        plies: number of random moves (>= 0).
        rng: the random generator (advanced).
        start_sfen: SFEN of the start (checked by the caller; cshogi aborts on malformed text).
        max_tries: attempts before giving up.

    Returns:
        ``(moves, tracker, legal)``: the opening's cshogi move codes (``plies`` of them), the
        :class:`RepetitionTracker` of the game so far (start and opening positions) and the last
        position's legal moves (cshogi order, non-empty).

    Raises:
        ValueError: the start position itself is over (no legal move, or a declaration possible),
            or no attempt succeeded in ``max_tries``.
    """
    no_limit = plies + 1
    for _ in range(max_tries):
        if start_sfen is None:
            board.reset()
        else:
            board.set_sfen(start_sfen)
        tracker = RepetitionTracker(board)
        legal = list(board.legal_moves)
        if judge(board, 1, 0, no_limit, bool(legal)):
            raise ValueError(f"the start position is already over: {board.sfen()!r}")
        moves: list[int] = []
        ended = False
        for ply in range(1, plies + 1):
            if not legal:
                break
            m = legal[int(rng.integers(len(legal)))]
            board.push(m)
            moves.append(m)
            c = tracker.push(board)
            legal = list(board.legal_moves)
            if not ended and judge(board, c, ply, no_limit, bool(legal)).reason:
                ended = True
        if legal and not ended:
            return moves, tracker, legal
    raise ValueError(f"no playable {plies}-ply random opening found in {max_tries} tries")


# ------------------------------------------------------------------------------------------------
# game records


@dataclass
class GameRecord:
    """A finished game.

    Attributes:
        start_sfen: SFEN of the game's real start (before any random opening moves).
        moves: every move in USI, opening moves included.
        result: +1 Black won, -1 White won, 0 draw.
        reason: why it ended.
        plies: number of moves (``len(moves)``).
        opening_plies: how many of the first moves were random opening moves.
    """

    start_sfen: str
    moves: list[str]
    result: int
    reason: EndReason
    plies: int
    opening_plies: int = 0

    def to_usi_position(self) -> str:
        """USI ``position`` command replaying the game: ``"position sfen <sfen> moves m1 m2 ..."``
        (``"position startpos moves ..."`` when the game started from the initial position)."""
        head = "position startpos" if self.start_sfen == STARTING_SFEN else f"position sfen {self.start_sfen}"
        return f"{head} moves {' '.join(self.moves)}" if self.moves else head

    def result_str(self) -> str:
        """``"1-0"`` (Black won), ``"0-1"`` (White won) or ``"1/2-1/2"``."""
        return {1: "1-0", -1: "0-1"}.get(self.result, "1/2-1/2")

    def to_dict(self) -> dict[str, str | int]:
        """Flat, JSON/Redis-friendly fields: ``start_sfen``, ``moves`` (space-separated USI),
        ``result`` (int), ``result_str``, ``reason`` (:class:`EndReason` member name, e.g.
        ``"REPETITION_DRAW"``), ``plies``, ``opening_plies``."""
        return {
            "start_sfen": self.start_sfen,
            "moves": " ".join(self.moves),
            "result": int(self.result),
            "result_str": self.result_str(),
            "reason": EndReason(self.reason).name,
            "plies": int(self.plies),
            "opening_plies": int(self.opening_plies),
        }
