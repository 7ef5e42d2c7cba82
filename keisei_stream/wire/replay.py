"""Replay validation of experience batches: is every position one cshogi can load, and is every
segment a legal run of moves that ended (or not) the way it says?

:func:`validate_hcp` is a NumPy re-implementation of Apery's HuffmanCodedPos decoder (the format
cshogi uses): cshogi's ``Board.set_hcp`` does no checks and can crash the process on malformed
bytes, so every HCP that reaches cshogi from the wire has passed it first. :func:`replay_check`
replays every segment with cshogi from its first position. Both are called by ``keisei_stream.wire.codec.decode_entry``;
this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cshogi
import numpy as np

from keisei_stream.shogi import EndReason, RepetitionTracker, judge, repetition_feature
# (2, 13527) uint16: low 15 bits of the cshogi move code of each action, per side to move; the
# shogi layer's own table, so that replay and self-play can never disagree on an action.
from keisei_stream.shogi.actions import _ACTION_TO_KEY

from .errors import BadEntry

if TYPE_CHECKING:
    from keisei_stream.experience import ExperienceBatch

# --------------------------------------------------------------------------------------------
# HCP validation (NumPy port of Apery's HuffmanCodedPos decoder, which cshogi uses)
#
# Source: Apery src/position.cpp, HuffmanCodedPos::boardCodeTable / handCodeTable and
# Position::set(const HuffmanCodedPos&). Bits are read least-significant first: bit 0 is the
# side to move, then 7 bits Black king square, 7 bits White king square, then every other
# square 0..80 (cshogi order) with a board code, then hand pieces until bit 256.


def _b(s: str) -> int:
    return int(s, 2)


_BOARD_CODES = {  # cshogi piece code -> (code, bits)
    0: (0, 1),
    1: (_b("1"), 4), 2: (_b("11"), 6), 3: (_b("111"), 6), 4: (_b("1011"), 6),
    5: (_b("11111"), 8), 6: (_b("111111"), 8), 7: (_b("1111"), 6),
    9: (_b("1001"), 4), 10: (_b("100011"), 6), 11: (_b("100111"), 6), 12: (_b("101011"), 6),
    13: (_b("10011111"), 8), 14: (_b("10111111"), 8),
    17: (_b("101"), 4), 18: (_b("10011"), 6), 19: (_b("10111"), 6), 20: (_b("11011"), 6),
    21: (_b("1011111"), 8), 22: (_b("1111111"), 8), 23: (_b("101111"), 6),
    25: (_b("1101"), 4), 26: (_b("110011"), 6), 27: (_b("110111"), 6), 28: (_b("111011"), 6),
    29: (_b("11011111"), 8), 30: (_b("11111111"), 8),
}
# hand kinds P L N S G B R: ((black code, bits), (white code, bits))
_HAND_CODES = [
    ((_b("0"), 3), (_b("100"), 3)), ((_b("1"), 5), (_b("10001"), 5)),
    ((_b("11"), 5), (_b("10011"), 5)), ((_b("101"), 5), (_b("10101"), 5)),
    ((_b("111"), 5), (_b("10111"), 5)), ((_b("11111"), 7), (_b("1011111"), 7)),
    ((_b("111111"), 7), (_b("1111111"), 7)),
]
# cshogi piece type (1..14) -> kind index in P L N S G B R order (promoted pieces count as base)
_TYPE_KIND = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 5: 5, 6: 6, 9: 0, 10: 1, 11: 2, 12: 3, 13: 5, 14: 6}
#: Pieces of each kind P L N S G B R in a complete set (board + hands, both sides, kings apart).
PIECE_SET = np.array([18, 4, 4, 4, 4, 2, 2], dtype=np.int16)


def _hcp_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables indexed by the next 8 bits of the stream, ``(256,) int16`` each: board kind
    (-2 invalid, -1 empty square, else P L N S G B R index) and code length, hand slot
    (``color * 7 + kind``, -1 invalid) and code length."""
    board_kind = np.full(256, -2, np.int16)  # -2 invalid, -1 empty, else kind
    board_len = np.zeros(256, np.int16)
    for pc, (code, nbits) in _BOARD_CODES.items():
        for w in range(256):
            if w & ((1 << nbits) - 1) == code:
                board_kind[w] = -1 if pc == 0 else _TYPE_KIND[pc & 15]
                board_len[w] = nbits
    hand_slot = np.full(256, -1, np.int16)  # color * 7 + kind
    hand_len = np.zeros(256, np.int16)
    for kind, codes in enumerate(_HAND_CODES):
        for color, (code, nbits) in enumerate(codes):
            for w in range(256):
                if w & ((1 << nbits) - 1) == code:
                    hand_slot[w] = color * 7 + kind
                    hand_len[w] = nbits
    return board_kind, board_len, hand_slot, hand_len


_BOARD_KIND, _BOARD_LEN, _HAND_SLOT, _HAND_LEN = _hcp_tables()


def validate_hcp(hcp: np.ndarray) -> np.ndarray:
    """Which HCPs cshogi can load safely: ``(M, 32) uint8 -> (M,) bool``.

    True when the bits decode as Apery's format does, ending exactly at bit 256, with both king
    squares < 81 and distinct, and exactly the standard piece set (18 P, 4 L, 4 N, 4 S, 4 G,
    2 B, 2 R counting promoted pieces as their base kind, board and hands together). cshogi's
    ``Board.set_hcp`` does no such checks and can crash the process on malformed input.
    Vectorised over positions (81 + 38 NumPy steps).
    """
    hcp = np.ascontiguousarray(hcp, dtype=np.uint8)
    m = hcp.shape[0]
    if m == 0:
        return np.zeros(0, bool)
    bits = np.zeros((m, 256 + 8), np.int16)
    bits[:, :256] = np.unpackbits(hcp, axis=1, bitorder="little")
    win = np.zeros((m, 257), np.int16)  # 8-bit window starting at each bit position
    for i in range(8):
        win += bits[:, i:i + 257] << i
    rows = np.arange(m)
    bk = hcp[:, 0].astype(np.int16) >> 1  # bits 1..7
    wk = hcp[:, 1].astype(np.int16) & 127  # bits 8..14
    bad = (bk >= 81) | (wk >= 81) | (bk == wk)
    counts = np.zeros((m, 8), np.int16)  # kinds 0..6, 7 = empty sink
    ptr = np.full(m, 15, np.int64)
    for sq in range(81):
        active = (bk != sq) & (wk != sq)
        w = win[rows, ptr]
        kind = _BOARD_KIND[w]
        bad |= active & (kind == -2)
        counts[rows, np.where(active & (kind >= 0), kind, 7)] += 1
        ptr = ptr + np.where(active, _BOARD_LEN[w], 0)
        bad |= ptr > 256  # Apery's reader would run past the 32 bytes
        np.minimum(ptr, 256, out=ptr)
    hands = np.zeros((m, 15), np.int16)  # 14 slots + sink
    for _ in range(40):
        active = ptr < 256
        if not active.any():
            break
        w = win[rows, np.minimum(ptr, 256)]
        hands[rows, np.where(active, _HAND_SLOT[w], 14)] += 1
        ptr = np.minimum(ptr + np.where(active, _HAND_LEN[w], 0), 257)
    # The last iteration may still leave ptr < 256 only with > 40 hand codes: too many pieces.
    bad |= ptr != 256
    total = counts[:, :7] + hands[:, :7] + hands[:, 7:14]
    bad |= (total != PIECE_SET).any(axis=1)
    return ~bad


def replay_check(batch: ExperienceBatch, max_plies: int) -> None:
    """Replay every segment with cshogi from its first position and check it against the recorded
    data.

    For each segment: the first position must pass :func:`validate_hcp` and the side not to move
    must not be in check; then the segment is replayed move by move under the one referee
    (:func:`keisei_stream.shogi.judge` with a :class:`~keisei_stream.shogi.RepetitionTracker`, as
    ``VecEnv`` plays): every action must be among cshogi's legal moves of the replayed board, the
    replayed board's HCP must equal the recorded one, the game must not have ended before the last
    move, and after it the referee's verdict (reason and result) must be the recorded one: the
    game's end, or for a cut segment (reason ``NONE``) no end. Repetition features must match the
    replay exactly for segments that start a game (ply 0) and may only be larger otherwise
    (occurrences before the first recorded position are unknown, so a recorded repetition end is
    then accepted where the referee sees none).

    Cost: about 5-12 us per position (one legal-move generation each), plus ~0.2 ms per batch.

    Args:
        batch: a batch whose structure and values ``decode_entry`` has already checked (offsets,
            action range, alternating sides to move); ``hcp`` is ``(P, 32) uint8``.
        max_plies: the run's ``env.max_plies`` (the ply limit itself is checked by the decoder).

    Raises:
        BadEntry: on the first inconsistency.
    """
    hcp = np.ascontiguousarray(batch.hcp, dtype=np.uint8)
    p = batch.num_positions
    off = batch.segment_offsets.astype(np.int64)
    starts = off[:-1]
    ok = validate_hcp(hcp[starts])
    if not ok.all():
        raise BadEntry(f"hcp: malformed first position of segment {int(np.flatnonzero(~ok)[0])}")
    hv = hcp.view(cshogi.HuffmanCodedPos).reshape(p)
    turn = (hcp[:, 0] & 1).astype(np.int64)
    move_keys = _ACTION_TO_KEY[turn, batch.action.astype(np.int64)].tolist()
    replayed = np.empty(p, dtype=cshogi.HuffmanCodedPos)
    rep = [0] * p
    board = cshogi.Board()
    flipped = np.empty(1, dtype=cshogi.HuffmanCodedPos)
    reasons = batch.reason.tolist()
    results = batch.result.tolist()
    plies = batch.ply.tolist()
    full_history = (batch.ply[starts] == 0).tolist()
    for g in range(batch.num_segments):
        s, e = int(off[g]), int(off[g + 1])
        flipped.view(np.uint8)[:] = hcp[s]
        flipped.view(np.uint8)[0] ^= 1
        board.set_hcp(flipped)
        if board.is_check():
            raise BadEntry(f"segment {g}: the side not to move is in check at the start")
        board.set_hcp(hv[s:s + 1])
        tracker = RepetitionTracker(board)
        legal = list(board.legal_moves)
        c = 1
        verdict = judge(board, c, plies[s], max_plies, bool(legal))
        for t in range(s, e):
            if verdict.reason:
                raise BadEntry(f"position {t}: the game had already ended ({verdict.reason.name})")
            board.to_hcp(replayed[t:t + 1])
            rep[t] = c
            mv = board.move_from_move16(move_keys[t])
            if mv not in legal:
                raise BadEntry(f"action {int(batch.action[t])} at position {t} is not legal")
            board.push(mv)
            legal = list(board.legal_moves)
            c = tracker.push(board)
            verdict = judge(board, c, plies[t] + 1, max_plies, bool(legal))
        want = EndReason(reasons[g])
        if verdict.reason == want and verdict.result(board.turn) == results[g]:
            continue
        if (not full_history[g] and want in (EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK)
                and verdict.reason in (EndReason.NONE, EndReason.ENTERING_KING, EndReason.MAX_PLIES)):
            continue  # occurrences before the first recorded position are unknown
        raise BadEntry(f"segment {g}: recorded {want.name} result {results[g]}, the referee says "
                       f"{verdict.reason.name} result {verdict.result(board.turn)}")
    rows = replayed.view(np.uint8).reshape(p, 32)
    if not np.array_equal(rows, hcp):
        bad = np.flatnonzero((rows != hcp).any(axis=1))[0]
        raise BadEntry(f"position {int(bad)} is not the previous position after its action")
    computed = repetition_feature(np.array(rep, dtype=np.int64))
    recorded = batch.repetition.astype(np.int64)
    exact = np.repeat(np.array(full_history, dtype=bool), np.diff(off))
    if ((exact & (recorded != computed)) | (~exact & (recorded < computed))).any():
        raise BadEntry("repetition: counts inconsistent with the replayed game")
