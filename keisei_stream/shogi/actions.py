"""The 13,527-action space (Keisei's) and its lookup tables against cshogi move codes.

Squares
    cshogi's square index ``sq = (file - 1) * 9 + rank`` with ``file`` 1..9 and ``rank`` 0..8 for
    USI ranks ``a``..``i`` (so ``1a`` = 0, ``1i`` = 8, ``2a`` = 9, ``9i`` = 80). Actions are in the
    **mover's frame**: when White moves, every square is rotated 180 degrees first
    (``sq -> 80 - sq``), so the same action means the same move "seen from the mover's chair" for
    both colours.

Action index (``0 <= action < NUM_ACTIONS = 13527``)
    * board move (``0 <= action < 12960``): ``(from_sq * 80 + to_idx) * 2 + promote`` where
      ``to_idx = to_sq if to_sq < from_sq else to_sq - 1`` (the index of ``to_sq`` among the 80
      squares other than ``from_sq``) and ``promote`` is 1 for a promoting move;
    * drop (``12960 <= action < 13527``): ``12960 + piece * 81 + to_sq`` with ``piece`` in the
      hand order P L N S G B R = 0..6 (cshogi's ``HAND_PIECES`` order).

    Many board actions are geometrically impossible for every piece; they are simply never legal.

cshogi move codes (checked empirically against cshogi 0.9, see ``tests/test_shogi_actions.py``)
    32-bit ints: bits 0-6 destination square; bits 7-13 source square, or ``80 + piece type`` for a
    drop (cshogi piece types PAWN=1 LANCE=2 KNIGHT=3 SILVER=4 BISHOP=5 ROOK=6 GOLD=7, so drops use
    81..87); bit 14 promotion; bits 16-19 moving piece type, bits 20-23 captured piece type (both
    ignored here). The tables below are indexed by the low 15 bits and the side to move.
"""

from __future__ import annotations

import cshogi
import numpy as np

NUM_ACTIONS = 13527
BOARD_MOVE_ACTIONS = 12960
NUM_DROP_ACTIONS = 567
NUM_SQUARES = 81

#: USI letters of the hand pieces in action (= cshogi HAND_PIECES) order P L N S G B R.
HAND_USI = "PLNSGBR"
#: cshogi piece type (1..7) of each hand index; and the hand index of each cshogi piece type.
_HAND_TO_PT = np.array([cshogi.PAWN, cshogi.LANCE, cshogi.KNIGHT, cshogi.SILVER, cshogi.GOLD, cshogi.BISHOP, cshogi.ROOK])
_PT_TO_HAND = {int(pt): h for h, pt in enumerate(_HAND_TO_PT)}

_RANKS = "abcdefghi"
SQUARE_USI = [f"{sq // 9 + 1}{_RANKS[sq % 9]}" for sq in range(NUM_SQUARES)]

_MOVE_KEY_BITS = 15  # to (7) | from (7) << 7 | promote (1) << 14
_MOVE_KEY_MASK = (1 << _MOVE_KEY_BITS) - 1


def _build_tables():
    """Build every table once at import (about 5 ms).

    Returns ``move_to_action (2 * 32768,) int64`` indexed by ``turn << 15 | (move & 0x7fff)``
    (-1 where the key is not a move), ``action_to_key (2, 13527) int64`` (the inverse: the low 15
    bits of the cshogi move code for each action and turn), ``action_usi`` (list of two lists of
    13,527 USI strings) and ``usi_action`` (two dicts USI -> action).
    """
    move_to_action = np.full(2 << _MOVE_KEY_BITS, -1, dtype=np.int64)
    action_to_key = np.full((2, NUM_ACTIONS), -1, dtype=np.int64)
    action_usi: list[list[str]] = [[""] * NUM_ACTIONS, [""] * NUM_ACTIONS]

    frm, to = np.meshgrid(np.arange(81), np.arange(81), indexing="ij")
    off = frm != to
    frm, to = frm[off], to[off]                    # (6480,) each, mover's frame
    to_idx = np.where(to < frm, to, to - 1)
    for promote in (0, 1):
        actions = (frm * 80 + to_idx) * 2 + promote
        for turn in (0, 1):
            f_abs = frm if turn == 0 else 80 - frm
            t_abs = to if turn == 0 else 80 - to
            key = t_abs | (f_abs << 7) | (promote << 14)
            move_to_action[(turn << _MOVE_KEY_BITS) | key] = actions
            action_to_key[turn, actions] = key
            suffix = "+" if promote else ""
            names = action_usi[turn]
            for a, f, t in zip(actions.tolist(), f_abs.tolist(), t_abs.tolist()):
                names[a] = SQUARE_USI[f] + SQUARE_USI[t] + suffix
    for hand in range(7):
        sq = np.arange(81)
        actions = BOARD_MOVE_ACTIONS + hand * 81 + sq
        for turn in (0, 1):
            t_abs = sq if turn == 0 else 80 - sq
            key = t_abs | ((80 + int(_HAND_TO_PT[hand])) << 7)
            move_to_action[(turn << _MOVE_KEY_BITS) | key] = actions
            action_to_key[turn, actions] = key
            names = action_usi[turn]
            for a, t in zip(actions.tolist(), t_abs.tolist()):
                names[a] = f"{HAND_USI[hand]}*{SQUARE_USI[t]}"
    usi_action = [{u: a for a, u in enumerate(action_usi[t])} for t in (0, 1)]
    return move_to_action, action_to_key, action_usi, usi_action


_MOVE_TO_ACTION, _ACTION_TO_KEY, _ACTION_USI, _USI_ACTION = _build_tables()
_MOVE_TO_ACTION.setflags(write=False)
_ACTION_TO_KEY.setflags(write=False)


def _check_turn(turn: int) -> int:
    if turn not in (0, 1):
        raise ValueError(f"turn must be cshogi.BLACK (0) or cshogi.WHITE (1), got {turn!r}")
    return int(turn)


def usi_to_action(usi: str, turn: int) -> int:
    """Action index of a USI move (``"7g7f"``, ``"8h2b+"``, ``"P*5e"``) for the side ``turn``.

    Only the syntax and the action space are checked, not legality in any position.

    Raises:
        ValueError: ``turn`` not 0/1, or ``usi`` is not a move of the action space
            (malformed, from == to, unknown piece letter, promoting drop, ...).
    """
    turn = _check_turn(turn)
    try:
        return _USI_ACTION[turn][usi]
    except (KeyError, TypeError):
        raise ValueError(f"not a USI move of the action space: {usi!r}") from None


def action_to_usi(action: int, turn: int) -> str:
    """USI string of ``action`` played by ``turn`` (inverse of :func:`usi_to_action`).

    Raises:
        ValueError: ``turn`` not 0/1 or ``action`` outside ``[0, 13527)``.
    """
    turn = _check_turn(turn)
    a = int(action)
    if not 0 <= a < NUM_ACTIONS or a != action:
        raise ValueError(f"action out of range [0, {NUM_ACTIONS}): {action!r}")
    return _ACTION_USI[turn][a]


def moves_to_actions(moves: np.ndarray, turn) -> np.ndarray:
    """Map cshogi move codes to action indices with one table lookup.

    Args:
        moves: ``(K,)`` integer array of cshogi 32-bit move codes (only bits 0-14 are used).
        turn: side to move, 0 (Black) / 1 (White), or a ``(K,)`` array of turns (one per move).

    Returns:
        ``(K,)`` int64 actions in ``[0, 13527)``.

    Raises:
        ValueError: a code is not a move (from == to, bad drop piece, promoting drop, negative)
            or a turn is not 0/1.
    """
    moves = np.asarray(moves)
    if moves.ndim != 1 or (moves.size and not np.issubdtype(moves.dtype, np.integer)):
        raise ValueError(f"moves must be a 1-D integer array, got shape {moves.shape} dtype {moves.dtype}")
    t = np.asarray(turn)
    if t.ndim == 0:
        t = int(_check_turn(int(t)))
    elif t.shape != moves.shape or ((t != 0) & (t != 1)).any():
        raise ValueError("turn must be 0/1 or a (K,) array of 0/1 matching moves")
    m = moves.astype(np.int64, copy=False)
    if (m < 0).any():
        raise ValueError("negative move code")
    actions = _MOVE_TO_ACTION[(np.asarray(t, dtype=np.int64) << _MOVE_KEY_BITS) | (m & _MOVE_KEY_MASK)]
    if actions.size and actions.min() < 0:
        bad = moves[np.flatnonzero(actions < 0)[0]]
        raise ValueError(f"not a move of the action space: cshogi move code {int(bad):#x}")
    return actions


def legal_moves_and_actions(board: cshogi.Board) -> tuple[np.ndarray, np.ndarray]:
    """Legal moves of ``board`` (cshogi's generator: drops, promotions, nifu, uchifuzume handled).

    Returns:
        ``moves (K,) uint32`` cshogi move codes and ``actions (K,) int64`` their action indices
        for the side to move, in cshogi's generation order. ``K == 0`` when the side to move has
        no legal move (checkmate).
    """
    moves = np.array(list(board.legal_moves), dtype=np.uint32)
    return moves, moves_to_actions(moves, board.turn)


def legal_mask(board: cshogi.Board) -> np.ndarray:
    """``(13527,) bool`` mask of the legal actions of the side to move of ``board``."""
    mask = np.zeros(NUM_ACTIONS, dtype=bool)
    mask[legal_moves_and_actions(board)[1]] = True
    return mask


def action_to_move(board: cshogi.Board, action: int) -> int:
    """The cshogi move code for ``action`` in ``board`` (push it with ``board.push``).

    Raises:
        ValueError: ``action`` is out of range or not legal in ``board``.
    """
    a = int(action)
    if not 0 <= a < NUM_ACTIONS or a != action:
        raise ValueError(f"action out of range [0, {NUM_ACTIONS}): {action!r}")
    moves, actions = legal_moves_and_actions(board)
    hit = np.flatnonzero(actions == a)
    if hit.size == 0:
        raise ValueError(f"action {a} ({_ACTION_USI[board.turn][a]}) is not legal in {board.sfen()}")
    return int(moves[hit[0]])
