"""Vectorised self-play environment: N cshogi boards stepped together, array outputs.

End rules: after every move each game is judged by :func:`.referee.judge` (checkmate, 4-fold
repetition with perpetual check, entering-king declaration, ``max_plies``; the rules, their order
and their sources are in :mod:`.referee`). The reward is the verdict's ``mover_score``: +1 / -1 / 0
for the player who just moved. Repetitions are counted per game by a
:class:`.referee.RepetitionTracker`.

Openings: with ``opening_plies = k`` each new game first plays k uniformly random legal moves
(:func:`.referee.random_opening`: a start during which the game ended is retried). Choice made
here: :attr:`GameRecord.start_sfen` is the real start (the initial position) and
:attr:`GameRecord.moves` holds all moves, the k random ones first (:attr:`GameRecord.opening_plies`
says how many); plies count from the real start, so plane 43 and ``max_plies`` count the opening
moves too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import cshogi
import numpy as np

from .actions import NUM_ACTIONS, _ACTION_USI
from .observation import NUM_PLANES, PIECE_PLANES, _check_max_plies, _fill_mask, _finish_planes
from .referee import STARTING_SFEN, EndReason, GameRecord, RepetitionTracker, judge, random_opening, repetition_feature

__all__ = ["STARTING_SFEN", "EndReason", "GameRecord", "StepResult", "VecEnv", "validate_sfen"]

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
        self._reps = [1] * n  # occurrences of each game's current position (plane 44 via repetition_feature)
        self._trackers = [RepetitionTracker() for _ in range(n)]
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
        k = self.opening_plies if sfen is None else 0
        history, tracker, legal = random_opening(board, k, self._rng, sfen)
        self._start_sfen[i] = STARTING_SFEN if sfen is None else board.sfen()  # k == 0 with an SFEN
        self._history[i] = history
        self._trackers[i] = tracker
        self._ply[i] = len(history)
        self._opening[i] = len(history)
        self._reps[i] = tracker.count(board)
        return legal

    def reset_game(self, index: int, sfen: str | None = None) -> None:
        """Abandon game ``index`` (no record) and start a new one, from ``sfen`` when given
        (ply 0, no random opening; used by tests and evaluation), else as a fresh game.

        Raises:
            ValueError: bad index, or ``sfen`` rejected by :func:`validate_sfen` / already over
                (no legal move, or the side to move can declare an entering-king win).
        """
        if not 0 <= index < self.num_games:
            raise ValueError(f"game index out of range: {index!r}")
        if sfen is not None:
            sfen = validate_sfen(sfen)
            probe = cshogi.Board(sfen)
            if judge(probe, 1, 0, self.max_plies):
                raise ValueError(f"the game is already over in {sfen!r}")
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
        _finish_planes(obs, np.array(hands, dtype=np.int64), turn, np.array(self._ply),
                       repetition_feature(np.array(self._reps)), self.max_plies)
        counts = np.fromiter(map(len, legal), dtype=np.int64, count=n)
        flat: list[int] = []
        for moves in legal:
            flat += moves
        self._flat_moves = np.array(flat, dtype=np.int64)
        self._counts = counts
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

    def observe_compact(self) -> dict[str, np.ndarray]:
        """The current positions' inputs in :func:`~keisei_stream.shogi.encode_positions_compact`'s
        form (``pieces (N, 284) uint8``, ``scalars (N, 18) float32``, ``actions (M,) int16``,
        ``counts (N,) int16``): about 0.4 KB a position to ship to a GPU instead of 28.4 KB."""
        n = self.num_games
        return {"pieces": np.packbits(self._obs[:, :PIECE_PLANES].reshape(n, -1) > 0.5, axis=1),
                "scalars": np.ascontiguousarray(self._obs[:, PIECE_PLANES:, 0, 0]),
                "actions": self._flat_actions.astype(np.int16), "counts": self._counts.astype(np.int16)}

    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Compact current positions: ``hcp (N, 32) uint8``, ``ply (N,) uint16``,
        ``repetition (N,) uint8`` (0..2) and ``turn (N,) uint8`` (0 Black, 1 White to move)."""
        hcp = np.empty((self.num_games, 32), dtype=np.uint8)
        for i, board in enumerate(self.boards):
            board.to_hcp(hcp[i])
        return (hcp, np.array(self._ply, dtype=np.uint16), repetition_feature(np.array(self._reps)).astype(np.uint8),
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
        boards, history, trackers, ply, reps = self.boards, self._history, self._trackers, self._ply, self._reps
        max_plies = self.max_plies
        for i in range(n):
            board = boards[i]
            board.push(moves[i])
            history[i].append(moves[i])
            p = ply[i] + 1
            ply[i] = p
            legal = list(board.legal_moves)
            c = trackers[i].push(board)
            verdict = judge(board, c, p, max_plies, bool(legal))
            if verdict.reason:
                reward[i] = verdict.mover_score
                reason[i] = verdict.reason
                finished.append(self._record(i, verdict.result(board.turn), verdict.reason))
                legal = self._new_game(i)
            else:
                reps[i] = c
            legal_all.append(legal)
        self._build(legal_all)
        return StepResult(reward=reward, done=reason != 0, reason=reason, finished=finished)
