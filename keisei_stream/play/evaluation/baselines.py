"""The players without a model: :class:`RandomPlayer` (uniform over the legal moves) and
:class:`GreedyPlayer` (1-ply material), the baselines of matches and of the Elo table (random = 0).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import cshogi
import numpy as np

from keisei_stream.play.players import STARTPOS

#: Piece values indexed by cshogi piece type (0 = none, 1 PAWN, 2 LANCE, 3 KNIGHT, 4 SILVER,
#: 5 BISHOP, 6 ROOK, 7 GOLD, 8 KING, 9 +P, 10 +L, 11 +N, 12 +S, 13 HORSE, 14 DRAGON), in
#: centipawn-like units, ``(16,) int64``. Source: the material values of Bonanza 6.0, which the
#: YaneuraOu engine keeps as its material evaluation (pawn 90, lance 315, knight 405, silver 495,
#: gold 540, bishop 855, rook 990, promoted pawn/lance/knight/silver 540, horse 945, dragon 1395);
#: the king is given 15000 (never captured in legal play).
PIECE_VALUES = np.array(
    [0, 90, 315, 405, 495, 855, 990, 540, 15000, 540, 540, 540, 540, 945, 1395, 0], dtype=np.int64
)
#: Gain of promoting a piece of each (unpromoted) type: value(promoted) - value(piece), ``(16,) int64``.
PROMOTION_GAIN = np.zeros(16, dtype=np.int64)
for _pt, _ppt in ((1, 9), (2, 10), (3, 11), (4, 12), (5, 13), (6, 14)):
    PROMOTION_GAIN[_pt] = PIECE_VALUES[_ppt] - PIECE_VALUES[_pt]


def move_gains(moves: np.ndarray) -> np.ndarray:
    """1-ply material gain of cshogi move codes: captured value + promotion gain.

    Args:
        moves: ``(K,)`` uint32 cshogi move codes (bits 14 = promotion, 16-19 = moved piece type,
            20-23 = captured piece type; see ``cshogi.move_cap`` / ``move_from_piece_type``).

    Returns:
        ``(K,)`` int64 gains in :data:`PIECE_VALUES` units.
    """
    m = moves.astype(np.int64)
    cap = (m >> 20) & 0xF
    moved = (m >> 16) & 0xF
    promo = (m >> 14) & 1
    return PIECE_VALUES[cap] + promo * PROMOTION_GAIN[moved]


def _legal_array(board: cshogi.Board) -> np.ndarray:
    return np.fromiter(board.legal_moves, dtype=np.uint32)


class RandomPlayer:
    """Uniformly random legal move (cshogi's legal move generator).

    Args:
        seed: seed of the move choice (``new_game(seed=...)`` reseeds it).
        name: shown in results.
    """

    def __init__(self, seed: int = 0, name: str = "random"):
        self.name = name
        self.rng = np.random.default_rng(seed)

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        """Reseed the move choice with ``seed`` (if given); the position is not needed."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]:
        """A cshogi move code, or ``"resign"`` without a legal move."""
        legal = _legal_array(board)
        if len(legal) == 0:
            return "resign"
        return int(legal[self.rng.integers(len(legal))])

    def close(self) -> None:
        """Nothing to release."""


class GreedyPlayer(RandomPlayer):
    """1-ply material greedy: the move with the largest :func:`move_gains` (capture of the most
    valuable piece, plus promotion gain), ties broken uniformly at random; with no capture or
    promotion available, a uniformly random legal move."""

    def __init__(self, seed: int = 0, name: str = "greedy"):
        super().__init__(seed, name)

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]:
        """A cshogi move code, or ``"resign"`` without a legal move."""
        legal = _legal_array(board)
        if len(legal) == 0:
            return "resign"
        gains = move_gains(legal)
        best = np.flatnonzero(gains == gains.max())
        return int(legal[best[self.rng.integers(len(best))]])
