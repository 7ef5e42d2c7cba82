"""Keisei's "core46" observation planes, built with cshogi's C++ plane writer.

Layout of one observation, ``(46, 9, 9) float32``, always from the side to move's point of view
(board rotated 180 degrees when White moves; "mover" = side to move). ``obs[c, f, r]`` is plane
``c`` at file index ``f`` (0 = file 1, in the mover's frame) and rank index ``r`` (0 = rank a,
the far side for the mover), i.e. ``obs[c].ravel()[sq]`` for cshogi square ``sq`` (mover's frame):

====== =====================================================================================
planes content
====== =====================================================================================
0-7    mover's P L N S G B R K (1 where such a piece stands)
8-13   mover's +P +L +N +S +B +R
14-27  the same 14 planes for the opponent
28-34  mover's hand P L N S G B R, count / max count (max: P 18, L N S G 4, B R 2)
35-41  opponent's hand, same order and scale
42     side to move: all ones when Black moves, zeros when White moves
43     ply / max_plies (ply = moves played since the game's real start)
44     repetition count of the position / 3: 0, 1/3, 2/3 (earlier occurrences; the 4th is a draw)
45     all ones (marks the board edge for zero-padded convolutions)
====== =====================================================================================

``Board.piece_planes_rotate`` (cshogi) writes the 28 piece planes in cshogi's piece-type order
P L N S B R G K +P +L +N +S +B +R, mover first and already rotated for White; it only writes ones
(the planes must be zeroed first) and writes nothing past plane 27, so it writes straight into
``obs[i]`` and one vectorised plane permutation per batch puts G before B and R.
"""

from __future__ import annotations

import cshogi
import numpy as np

from .actions import _MOVE_KEY_BITS, _MOVE_KEY_MASK, _MOVE_TO_ACTION, NUM_ACTIONS

NUM_PLANES = 46
#: Maximum count of each hand piece (P L N S G B R), the scale of planes 28-41.
HAND_MAX = np.array([18, 4, 4, 4, 4, 2, 2], dtype=np.float32)
_HAND_SCALE = np.concatenate([1.0 / HAND_MAX, 1.0 / HAND_MAX]).astype(np.float32)  # (14,)
# cshogi order P L N S B R G -> core46 order P L N S G B R (for mover planes 0-6 and opponent 14-20)
_PERM_DST = np.array([4, 5, 6, 18, 19, 20])
_PERM_SRC = np.array([6, 4, 5, 20, 18, 19])


def _finish_planes(obs: np.ndarray, hands: np.ndarray, turn: np.ndarray, ply: np.ndarray,
                   repetition: np.ndarray, max_plies: int) -> None:
    """Vectorised tail shared by every encoder: piece-plane permutation and planes 28-45.

    ``obs (P, 46, 9, 9) float32`` with planes 0-27 written by cshogi; ``hands (P, 14)`` counts
    (mover's 7 then opponent's 7); ``turn, ply, repetition (P,)``.
    """
    obs[:, _PERM_DST] = obs[:, _PERM_SRC]
    obs[:, 28:42] = (hands.astype(np.float32) * _HAND_SCALE)[:, :, None, None]
    obs[:, 42] = (turn == 0).astype(np.float32)[:, None, None]
    obs[:, 43] = (ply.astype(np.float32) / np.float32(max_plies))[:, None, None]
    obs[:, 44] = (repetition.astype(np.float32) / np.float32(3.0))[:, None, None]
    obs[:, 45] = 1.0


def _fill_mask(mask: np.ndarray, moves: np.ndarray, counts: np.ndarray, turn: np.ndarray) -> np.ndarray:
    """Set ``mask (P, 13527) bool`` from the flat legal moves of P positions; returns the actions.

    ``moves (M,)`` cshogi codes of all positions back to back, ``counts (P,)`` moves per position,
    ``turn (P,)`` side to move. Returns ``(M,) int64`` actions. ``mask`` is cleared first.
    """
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    actions = _actions(moves, rows, turn)
    mask[...] = False
    mask.reshape(-1)[rows * NUM_ACTIONS + actions] = True
    return actions


def _actions(moves: np.ndarray, rows: np.ndarray, turn: np.ndarray) -> np.ndarray:
    """``(M,) int64`` actions of the flat cshogi ``moves``; ``rows (M,)`` their positions' indices."""
    keys = (turn.astype(np.int64)[rows] << _MOVE_KEY_BITS) | (moves.astype(np.int64) & _MOVE_KEY_MASK)
    return _MOVE_TO_ACTION[keys]


def _check_max_plies(max_plies: int) -> int:
    if int(max_plies) != max_plies or max_plies < 1:
        raise ValueError(f"max_plies must be a positive integer, got {max_plies!r}")
    return int(max_plies)


def encode_observation(board: cshogi.Board, ply: int, repetition: int, max_plies: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Core46 observation of ``board`` for its side to move.

    Args:
        board: the position (not modified).
        ply: moves played since the game's start (plane 43 = ply / max_plies).
        repetition: earlier occurrences of this position in the game, 0..2 (plane 44 = rep / 3).
        max_plies: the game length limit (> 0).
        out: optional C-contiguous ``(46, 9, 9) float32`` array to write into.

    Returns:
        ``(46, 9, 9) float32`` (``out`` when given).

    Raises:
        ValueError: bad ``out`` shape/dtype/layout, ``repetition`` not in 0..2, ``ply < 0`` or
            ``max_plies < 1``.
    """
    max_plies = _check_max_plies(max_plies)
    if not 0 <= repetition <= 2:
        raise ValueError(f"repetition must be 0, 1 or 2, got {repetition!r}")
    if ply < 0:
        raise ValueError(f"ply must be >= 0, got {ply!r}")
    if out is None:
        out = np.zeros((NUM_PLANES, 9, 9), dtype=np.float32)
    else:
        if out.shape != (NUM_PLANES, 9, 9) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous (46, 9, 9) float32 array")
        out[:28] = 0.0
    board.piece_planes_rotate(out)
    black, white = board.pieces_in_hand
    turn = board.turn
    hands = np.array([black + white if turn == 0 else white + black])
    _finish_planes(out[None], hands, np.array([turn]), np.array([ply]), np.array([repetition]), max_plies)
    return out


def _check_hcp(hcp: np.ndarray) -> np.ndarray:
    """Validate the cheap invariants of HCPs that cshogi does not check before trusting them.

    cshogi's ``set_hcp`` can crash the process (segmentation fault, seen here with random bytes)
    when a king square field is >= 81, so king squares are checked before any ``set_hcp``:
    HCP bit 0 = side to move, bits 1-7 Black's king square, bits 8-14 White's (LSB first).
    """
    hcp = np.asarray(hcp)
    if hcp.ndim != 2 or hcp.shape[1] != 32 or hcp.dtype != np.uint8:
        raise ValueError(f"hcp must be a (P, 32) uint8 array, got shape {hcp.shape} dtype {hcp.dtype}")
    head = hcp[:, 0].astype(np.int64) | (hcp[:, 1].astype(np.int64) << 8)
    k_black = (head >> 1) & 0x7F
    k_white = (head >> 8) & 0x7F
    bad = (k_black >= 81) | (k_white >= 81) | (k_black == k_white)
    if bad.any():
        raise ValueError(f"invalid HCP at index {int(np.flatnonzero(bad)[0])}: bad king squares")
    return np.ascontiguousarray(hcp)


def _check_inputs(hcp: np.ndarray, ply: np.ndarray, repetition: np.ndarray,
                  max_plies: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(max_plies, hcp, ply, repetition)`` of P positions (see :func:`encode_positions`)."""
    max_plies = _check_max_plies(max_plies)
    hcp = _check_hcp(hcp)
    p = hcp.shape[0]
    ply = np.asarray(ply)
    repetition = np.asarray(repetition)
    if ply.shape != (p,) or repetition.shape != (p,):
        raise ValueError(f"ply and repetition must have shape ({p},), got {ply.shape} and {repetition.shape}")
    if p and (ply.min() < 0 or repetition.min() < 0 or repetition.max() > 2):
        raise ValueError("ply must be >= 0 and repetition in 0..2")
    return max_plies, hcp, ply, repetition


def encode_positions(hcp: np.ndarray, ply: np.ndarray, repetition: np.ndarray, max_plies: int,
                     out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild observations and legal masks from compact positions (the learner's inputs).

    Args:
        hcp: ``(P, 32) uint8`` cshogi/Apery HuffmanCodedPos, one per position (side to move
            included).
        ply: ``(P,)`` integers, moves played since the game's start.
        repetition: ``(P,)`` integers 0..2, earlier occurrences of each position in its game.
        max_plies: the game length limit used for plane 43.
        out: optional ``(obs, mask)`` C-contiguous arrays of at least P rows to write into (rows
            beyond P are left alone); reusing them avoids the page faults of fresh ~14 KB/position
            allocations (about 2x faster on small batches).

    Returns:
        ``obs (P, 46, 9, 9) float32`` exactly as :func:`encode_observation` and
        ``mask (P, 13527) bool`` exactly as :func:`legal_mask` for each position (views of
        ``out`` when given).

    Raises:
        ValueError: shapes/dtypes/ranges wrong, or an HCP is not a decodable position (bad king
            squares, bad Huffman code). Positions that decode but are not legal shogi positions
            (e.g. 3 bishops) are not detected here; replay checks belong to the codec. Also
            raised for a bad ``out``.

    Speed: one reused ``cshogi.Board``; per position ``set_hcp`` + cshogi's plane writer + the
    legal move list, then every array operation vectorised over P (about 4 us/position here).
    """
    max_plies, hcp, ply, repetition = _check_inputs(hcp, ply, repetition, max_plies)
    p = hcp.shape[0]
    if out is None:
        obs = np.zeros((p, NUM_PLANES, 9, 9), dtype=np.float32)
        mask = np.empty((p, NUM_ACTIONS), dtype=bool)
    else:
        obs, mask = out
        if (not isinstance(obs, np.ndarray) or obs.dtype != np.float32 or obs.shape[1:] != (NUM_PLANES, 9, 9)
                or not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape[1:] != (NUM_ACTIONS,)
                or len(obs) < p or len(mask) < p or not obs.flags.c_contiguous or not mask.flags.c_contiguous):
            raise ValueError("out must be (obs (>=P, 46, 9, 9) float32, mask (>=P, 13527) bool), C-contiguous")
        obs, mask = obs[:p], mask[:p]
        obs[:, :28] = 0.0
    moves, counts, turn = _planes_and_moves(hcp, ply, repetition, max_plies, obs)
    _fill_mask(mask, moves, counts, turn)
    return obs, mask


def _planes_and_moves(hcp: np.ndarray, ply: np.ndarray, repetition: np.ndarray, max_plies: int,
                      obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the planes of P checked positions into ``obs (P, 46, 9, 9) float32`` (planes 0-27 zero);
    returns their legal moves ``(M,) int64`` (cshogi codes, back to back), ``counts (P,) int64``
    and ``turn (P,) int64``."""
    reader = _PositionReader(hcp.shape[0])
    reader.read(hcp, 0, hcp.shape[0], obs)
    _finish_planes(obs, reader.hands, reader.turn, ply, repetition, max_plies)
    return reader.moves_array(), reader.counts, reader.turn


class _PositionReader:
    """Reads checked HCPs with one reused ``cshogi.Board``: piece planes, hands, side to move and
    legal moves, for a range of positions at a time (every encoder's per-position loop)."""

    def __init__(self, p: int) -> None:
        self.hands = np.empty((p, 14), dtype=np.int64)
        self.turn = np.empty(p, dtype=np.int64)
        self.counts = np.empty(p, dtype=np.int64)
        self.moves: list[int] = []
        self.board = cshogi.Board()

    def read(self, hcp: np.ndarray, lo: int, hi: int, planes_out: np.ndarray) -> None:
        """Positions ``lo..hi-1``: planes 0-27 into ``planes_out[i - lo]`` (float32, at least 28
        planes, zeroed by the caller), hands/turn/counts at ``i``, legal moves appended.

        Raises:
            ValueError: an HCP cshogi cannot decode (its index named).
        """
        board, extend = self.board, self.moves.extend
        set_hcp, planes = board.set_hcp, board.piece_planes_rotate
        for i in range(lo, hi):
            try:
                set_hcp(hcp[i])
            except RuntimeError as e:
                raise ValueError(f"invalid HCP at index {i}: {e}") from None
            planes(planes_out[i - lo])
            black, white = board.pieces_in_hand
            t = board.turn
            self.turn[i] = t
            self.hands[i] = black + white if t == 0 else white + black
            n0 = len(self.moves)
            extend(board.legal_moves)
            self.counts[i] = len(self.moves) - n0

    def moves_array(self) -> np.ndarray:
        """The legal moves read so far, ``(M,) int64`` cshogi codes, back to back."""
        return np.array(self.moves, dtype=np.int64)


#: Planes 0-27 (pieces) are 0/1 on every square; planes 28-45 are one value over the whole board.
PIECE_PLANES = 28
SCALAR_PLANES = NUM_PLANES - PIECE_PLANES
#: Bytes of the bit-packed piece planes of one position (28 x 81 bits, rounded up).
PACKED_PIECE_BYTES = (PIECE_PLANES * 81 + 7) // 8
#: Positions per scratch fill of :func:`encode_positions_compact`.
COMPACT_CHUNK = 1024


def encode_positions_compact(hcp: np.ndarray, ply: np.ndarray, repetition: np.ndarray,
                             max_plies: int, chunk: int = COMPACT_CHUNK) -> dict[str, np.ndarray]:
    """The learner's inputs in a compact form to ship to the device, where
    :func:`keisei_stream.rl.inputs.expand_inputs` rebuilds exactly :func:`encode_positions`'s
    ``(obs, mask)``.

    Built directly in packed form, ``chunk`` positions at a time: the piece planes of a chunk are
    written by cshogi into one reused ``(chunk, 28, 9, 9) float32`` scratch array (9 KB a
    position) and bit-packed from there, and planes 28-45 are computed as scalars, so no dense
    array of the whole batch is ever built (a 65,536-position update's would be 0.98 GB).

    Args: as :func:`encode_positions`; ``chunk``: positions per scratch fill (>= 1).

    Returns:
        ``pieces (P, 284) uint8``: planes 0-27 bit-packed (``np.packbits``, big-endian bit order,
        28 x 81 = 2268 bits); ``scalars (P, 18) float32``: the value of planes 28-45;
        ``actions (M,) int16``: the legal actions of all positions back to back;
        ``counts (P,) int16``: legal actions per position. About 360 + 2 x (legal moves) bytes per
        position (at most ~1.6 KB; the dense pair is 28.4 KB).

    Raises:
        ValueError: as :func:`encode_positions`.
    """
    max_plies, hcp, ply, repetition = _check_inputs(hcp, ply, repetition, max_plies)
    p = hcp.shape[0]
    pieces = np.empty((p, PACKED_PIECE_BYTES), np.uint8)
    reader = _PositionReader(p)
    scratch = np.empty((max(1, min(int(chunk), p)), PIECE_PLANES, 9, 9), np.float32)
    for s in range(0, p, len(scratch)):
        e = min(s + len(scratch), p)
        block = scratch[:e - s]
        block[...] = 0.0
        reader.read(hcp, s, e, block)  # cshogi writes planes 0-27 only
        block[:, _PERM_DST] = block[:, _PERM_SRC]
        pieces[s:e] = np.packbits(block.reshape(e - s, -1) > 0.5, axis=1)
    turn, counts = reader.turn, reader.counts
    scalars = np.empty((p, SCALAR_PLANES), np.float32)  # planes 28-45 as _finish_planes writes them
    scalars[:, :14] = reader.hands.astype(np.float32) * _HAND_SCALE
    scalars[:, 14] = turn == 0
    scalars[:, 15] = ply.astype(np.float32) / np.float32(max_plies)
    scalars[:, 16] = repetition.astype(np.float32) / np.float32(3.0)
    scalars[:, 17] = 1.0
    actions = _actions(reader.moves_array(), np.repeat(np.arange(p, dtype=np.int64), counts), turn)
    return {"pieces": pieces, "scalars": scalars, "actions": actions.astype(np.int16), "counts": counts.astype(np.int16)}
