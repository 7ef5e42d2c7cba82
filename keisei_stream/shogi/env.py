"""Vectorised self-play environment: N cshogi boards stepped together, array outputs.

Game end rules, checked in this order after every move (cshogi supplies every rule):

1. the side to move has no legal move -> ``CHECKMATE``: the last mover wins (+1). cshogi never
   generates an uchifuzume (pawn-drop mate), so such a mate cannot arise.
2. the position occurs for the 4th time in the game (sennichite; positions compared by cshogi's
   Zobrist key, which includes hands and side to move) -> ``cshogi.Board.is_draw()`` tells who, if
   anyone, gave check on every move of the last cycle: ``REPETITION_WIN`` (the side to move wins:
   the last mover checked throughout) -> ``PERPETUAL_CHECK``, last mover -1; ``REPETITION_LOSE``
   (the side to move was the checker) -> ``PERPETUAL_CHECK``, last mover +1; anything else ->
   ``REPETITION_DRAW`` (0). ``is_draw`` alone fires at the first repetition (search rule), so the
   4-fold count is kept here per game in a dict of Zobrist keys.
3. the side to move can declare an entering-king win (``Board.is_nyugyoku()``, the CSA 27-point
   rule) -> ``ENTERING_KING``: the side to move wins, the last mover gets -1.
4. ``ply == max_plies`` -> ``MAX_PLIES``, draw (0).

Openings: with ``opening_plies = k`` each new game first plays k uniformly random legal moves (a
start that ended the game is retried). Choice made here: :attr:`GameRecord.start_sfen` is the
real start (the initial position) and :attr:`GameRecord.moves` holds all moves, the k random ones
first (:attr:`GameRecord.opening_plies` says how many); plies count from the real start, so plane
43 and ``max_plies`` count the opening moves too.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import cshogi
import numpy as np

from .actions import NUM_ACTIONS, _ACTION_USI
from .observation import NUM_PLANES, _check_max_plies, _fill_mask, _finish_planes

STARTING_SFEN = cshogi.STARTING_SFEN

_SFEN_RANK = re.compile(r"^(?:[1-9]|\+?[PLNSBRplnsbr]|[GKgk])+$")
_SFEN_HAND = re.compile(r"^(?:-|(?:(?:1[0-8]|[2-9])?[PLNSGBRplnsgbr])+)$")
_PIECE_TOTAL = {"P": 18, "L": 4, "N": 4, "S": 4, "G": 4, "B": 2, "R": 2, "K": 2}


def validate_sfen(sfen: str) -> str:
    """Check an SFEN before it reaches cshogi and return it (whitespace-normalised).

    cshogi's ``set_sfen`` aborts the whole process (uncaught C++ exception) on malformed text and
    silently accepts impossible positions (no kings, 20 pawns), so every SFEN from outside goes
    through here: 9 ranks of 9 squares, valid pieces, one king per side, piece totals within the
    set (P 18, L N S G 4, B R 2, promoted pieces counted as their base piece, hands included),
    side to move ``b``/``w``, optional move number >= 1. Legality beyond that (nifu, a pawn on
    the last rank, the side not to move in check) is not checked.

    Raises:
        ValueError: any of the above fails.
    """
    if not isinstance(sfen, str):
        raise ValueError(f"SFEN must be a string, got {type(sfen).__name__}")
    fields = sfen.split()
    if not 2 <= len(fields) <= 4:
        raise ValueError(f"bad SFEN (expected 'board side hand [move]'): {sfen!r}")
    board, side = fields[0], fields[1]
    hand = fields[2] if len(fields) > 2 else "-"
    move = fields[3] if len(fields) > 3 else "1"
    ranks = board.split("/")
    if len(ranks) != 9 or not all(_SFEN_RANK.match(r) for r in ranks):
        raise ValueError(f"bad SFEN board: {sfen!r}")
    totals = dict.fromkeys(_PIECE_TOTAL, 0)
    kings = [0, 0]
    for rank in ranks:
        width = 0
        for ch in rank:
            if ch.isdigit():
                width += int(ch)
            elif ch != "+":
                width += 1
                totals[ch.upper()] += 1
                if ch in "Kk":
                    kings[ch == "k"] += 1
        if width != 9:
            raise ValueError(f"bad SFEN rank {rank!r} (not 9 squares): {sfen!r}")
    if kings != [1, 1]:
        raise ValueError(f"SFEN needs exactly one king per side: {sfen!r}")
    if side not in ("b", "w"):
        raise ValueError(f"bad SFEN side to move {side!r}: {sfen!r}")
    if not _SFEN_HAND.match(hand):
        raise ValueError(f"bad SFEN hand {hand!r}: {sfen!r}")
    for count, piece in re.findall(r"(\d*)([A-Za-z])", "" if hand == "-" else hand):
        totals[piece.upper()] += int(count or 1)
    if any(totals[p] > n for p, n in _PIECE_TOTAL.items()):
        raise ValueError(f"SFEN has more pieces than a shogi set: {sfen!r}")
    if not move.isdigit() or int(move) < 1:
        raise ValueError(f"bad SFEN move number {move!r}: {sfen!r}")
    return f"{board} {side} {hand} {int(move)}"


class EndReason(enum.IntEnum):
    """Why a game ended (``uint8`` on the wire). 6-8 are used by evaluation only."""

    NONE = 0
    CHECKMATE = 1
    REPETITION_DRAW = 2
    PERPETUAL_CHECK = 3
    ENTERING_KING = 4
    MAX_PLIES = 5
    ILLEGAL = 6
    RESIGN = 7
    TIMEOUT = 8


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
        ``result`` (int), ``result_str``, ``reason`` (name), ``plies``, ``opening_plies``."""
        return {
            "start_sfen": self.start_sfen,
            "moves": " ".join(self.moves),
            "result": int(self.result),
            "result_str": self.result_str(),
            "reason": EndReason(self.reason).name,
            "plies": int(self.plies),
            "opening_plies": int(self.opening_plies),
        }


@dataclass
class StepResult:
    """Outcome of :meth:`VecEnv.step` for N games.

    Attributes:
        reward: ``(N,) float32`` for the player who just moved: +1 win, -1 loss, 0 otherwise.
        done: ``(N,) bool`` the game ended with this move (and was reset to a new game).
        reason: ``(N,) uint8`` :class:`EndReason` codes, 0 where not ended.
        finished: records of the games that ended in this step, in index order.
    """

    reward: np.ndarray
    done: np.ndarray
    reason: np.ndarray
    finished: list[GameRecord] = field(default_factory=list)


class VecEnv:
    """N games of shogi stepped together; observations and masks in preallocated arrays.

    Args:
        num_games: N >= 1.
        max_plies: a game reaching this many plies is a draw (>= 1, > opening_plies).
        seed: seeds the random opening moves.
        opening_plies: random legal moves played at the start of every game (>= 0).

    Raises:
        ValueError: bad arguments.
    """

    def __init__(self, num_games: int, max_plies: int, seed: int = 0, opening_plies: int = 0):
        if int(num_games) != num_games or num_games < 1:
            raise ValueError(f"num_games must be >= 1, got {num_games!r}")
        self.max_plies = _check_max_plies(max_plies)
        if int(opening_plies) != opening_plies or not 0 <= opening_plies < max_plies:
            raise ValueError(f"opening_plies must be in [0, max_plies), got {opening_plies!r}")
        self.num_games = n = int(num_games)
        self.opening_plies = int(opening_plies)
        self._rng = np.random.default_rng(seed)
        self.boards = [cshogi.Board() for _ in range(n)]
        self._obs = np.zeros((n, NUM_PLANES, 9, 9), dtype=np.float32)
        self._obs_rows = [self._obs[i] for i in range(n)]
        self._mask = np.zeros((n, NUM_ACTIONS), dtype=bool)
        self._ply = [0] * n
        self._rep = [0] * n
        self._counts: list[dict[int, int]] = [{} for _ in range(n)]
        self._history: list[list[int]] = [[] for _ in range(n)]
        self._start_sfen = [STARTING_SFEN] * n
        self._opening = [0] * n
        self._turn = np.zeros(n, dtype=np.int64)
        self._row_ids = np.zeros(0, dtype=np.int64)
        self._flat_moves = np.zeros(0, dtype=np.int64)
        self._flat_actions = np.zeros(0, dtype=np.int64)
        legal = [self._new_game(i) for i in range(n)]
        self._build(legal)

    # ----------------------------------------------------------------- game lifecycle
    def _new_game(self, i: int, sfen: str | None = None) -> list[int]:
        """Reset game ``i`` (random opening unless ``sfen`` is given); returns its legal moves."""
        board = self.boards[i]
        while True:
            if sfen is None:
                board.reset()
            else:
                board.set_sfen(sfen)
            self._start_sfen[i] = STARTING_SFEN if sfen is None else board.sfen()
            self._history[i] = history = []
            self._counts[i] = counts = {board.zobrist_hash(): 1}
            legal = list(board.legal_moves)
            k = self.opening_plies if sfen is None else 0
            for _ in range(k):
                if not legal:
                    break
                m = legal[int(self._rng.integers(len(legal)))]
                board.push(m)
                history.append(m)
                key = board.zobrist_hash()
                counts[key] = counts.get(key, 0) + 1
                legal = list(board.legal_moves)
            if legal and max(counts.values()) < 4 and not board.is_nyugyoku():
                break
        self._ply[i] = len(history)
        self._opening[i] = len(history)
        self._rep[i] = min(counts[board.zobrist_hash()] - 1, 2)
        return legal

    def reset_game(self, index: int, sfen: str | None = None) -> None:
        """Abandon game ``index`` (no record) and start a new one, from ``sfen`` when given
        (ply 0, no random opening; used by tests and evaluation), else as a fresh game.

        Raises:
            ValueError: bad index, or ``sfen`` rejected by :func:`validate_sfen` / without legal
                moves.
        """
        if not 0 <= index < self.num_games:
            raise ValueError(f"game index out of range: {index!r}")
        if sfen is not None:
            sfen = validate_sfen(sfen)
            probe = cshogi.Board(sfen)
            if len(probe.legal_moves) == 0:
                raise ValueError(f"no legal move in {sfen!r}")
        self._new_game(index, sfen)
        self._build([list(b.legal_moves) for b in self.boards])

    def _record(self, i: int, result: int, reason: EndReason) -> GameRecord:
        hist = self._history[i]
        return GameRecord(start_sfen=self._start_sfen[i], moves=[cshogi.move_to_usi(m) for m in hist],
                          result=result, reason=reason, plies=len(hist), opening_plies=self._opening[i])

    # ----------------------------------------------------------------- arrays
    def _build(self, legal: list[list[int]]) -> None:
        """Observation, mask and the flat legal-move tables for the current positions of all games."""
        n = self.num_games
        obs = self._obs
        obs[:, :28] = 0.0
        hands = []
        turns = []
        rows = self._obs_rows
        for i, board in enumerate(self.boards):
            board.piece_planes_rotate(rows[i])
            black, white = board.pieces_in_hand
            t = board.turn
            turns.append(t)
            hands.append(black + white if t == 0 else white + black)
        self._turn = turn = np.array(turns, dtype=np.int64)
        _finish_planes(obs, np.array(hands, dtype=np.int64), turn, np.array(self._ply), np.array(self._rep), self.max_plies)
        counts = np.fromiter(map(len, legal), dtype=np.int64, count=n)
        flat: list[int] = []
        for moves in legal:
            flat += moves
        self._flat_moves = np.array(flat, dtype=np.int64)
        self._row_ids = np.repeat(np.arange(n, dtype=np.int64), counts)
        self._flat_actions = _fill_mask(self._mask, self._flat_moves, counts, turn)

    def observe(self, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Current positions' ``obs (N, 46, 9, 9) float32`` and ``mask (N, 13527) bool``.

        With ``copy=False`` the env's own buffers are returned: they are overwritten by the next
        :meth:`step` and must not be modified.
        """
        if copy:
            return self._obs.copy(), self._mask.copy()
        return self._obs, self._mask

    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Compact current positions: ``hcp (N, 32) uint8``, ``ply (N,) uint16``,
        ``repetition (N,) uint8`` (0..2) and ``turn (N,) uint8`` (0 Black, 1 White to move)."""
        hcp = np.empty((self.num_games, 32), dtype=np.uint8)
        for i, board in enumerate(self.boards):
            board.to_hcp(hcp[i])
        return (hcp, np.array(self._ply, dtype=np.uint16), np.array(self._rep, dtype=np.uint8),
                self._turn.astype(np.uint8))

    def legal_actions(self, index: int) -> np.ndarray:
        """``(K,) int64`` legal actions of game ``index`` (cshogi generation order)."""
        return self._flat_actions[self._row_ids == index]

    def action_usi(self, actions: np.ndarray) -> list[str]:
        """USI strings of ``actions (N,)`` played in the current positions of the N games."""
        return [_ACTION_USI[t][int(a)] for t, a in zip(self._turn.tolist(), np.asarray(actions).tolist())]

    # ----------------------------------------------------------------- step
    def step(self, actions: np.ndarray) -> StepResult:
        """Play one move in every game.

        Args:
            actions: ``(N,)`` integer actions, each legal in its game's current position
                (``observe()[1][i, actions[i]]`` is True).

        Returns:
            :class:`StepResult`; games that ended are already reset to a new game, so
            :meth:`observe` then shows their new start positions.

        Raises:
            ValueError: wrong shape, or an action out of range / illegal (nothing is played).
        """
        n = self.num_games
        actions = np.asarray(actions)
        if actions.shape != (n,) or (n and not np.issubdtype(actions.dtype, np.integer)):
            raise ValueError(f"actions must be an integer array of shape ({n},), got {actions.shape} {actions.dtype}")
        actions = actions.astype(np.int64, copy=False)
        in_range = (actions >= 0) & (actions < NUM_ACTIONS)
        ok = in_range.copy()
        ok[in_range] = self._mask[np.flatnonzero(in_range), actions[in_range]]
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise ValueError(f"illegal actions in games {bad[:10].tolist()}: {actions[bad[:10]].tolist()}")
        sel = np.flatnonzero(self._flat_actions == actions[self._row_ids])
        moves = self._flat_moves[sel].tolist()

        reward = np.zeros(n, dtype=np.float32)
        reason = np.zeros(n, dtype=np.uint8)
        finished: list[GameRecord] = []
        legal_all: list[list[int]] = []
        boards, history, counts_all, ply, rep = self.boards, self._history, self._counts, self._ply, self._rep
        max_plies = self.max_plies
        for i in range(n):
            board = boards[i]
            mover = board.turn
            board.push(moves[i])
            history[i].append(moves[i])
            p = ply[i] + 1
            ply[i] = p
            legal = list(board.legal_moves)
            why = 0
            if not legal:
                why, r = 1, 1.0
            else:
                key = board.zobrist_hash()
                counts = counts_all[i]
                c = counts.get(key, 0) + 1
                counts[key] = c
                rep[i] = c - 1 if c < 3 else 2
                if c >= 4:
                    d = board.is_draw()
                    if d == cshogi.REPETITION_WIN:
                        why, r = 3, -1.0
                    elif d == cshogi.REPETITION_LOSE:
                        why, r = 3, 1.0
                    else:
                        why, r = 2, 0.0
                elif board.is_nyugyoku():
                    why, r = 4, -1.0
                elif p >= max_plies:
                    why, r = 5, 0.0
            if why:
                reward[i] = r
                reason[i] = why
                finished.append(self._record(i, int(r) if mover == cshogi.BLACK else -int(r), EndReason(why)))
                legal = self._new_game(i)
            legal_all.append(legal)
        self._build(legal_all)
        return StepResult(reward=reward, done=reason != 0, reason=reason, finished=finished)
