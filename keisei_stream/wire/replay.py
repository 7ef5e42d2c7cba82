"""Replay validation of experience batches: is every position one cshogi can load, is every
segment a legal run of moves that continues its game and ended (or not) the way the rules and the
game's history say?

:func:`validate_hcp` is a NumPy re-implementation of Apery's HuffmanCodedPos decoder (the format
cshogi uses): cshogi's ``Board.set_hcp`` does no checks and can crash the process on malformed
bytes, so every HCP that reaches cshogi from the wire has passed it first. :func:`replay_check`
replays every segment with cshogi from its first position, following each game across its
segments in a :class:`GameBook` (the consumer's memory of the games in flight). Both are called by
``keisei_stream.wire.codec.decode_entry``; this module does not import torch.

**Following a game.** A segment continues its game when its first ply is the ply after the
previous segment's last move; its first position must then be the position after that move, and
its repetition counts and its ending are judged over the whole game so far (a 4th occurrence
ends the game; perpetual check is told from a draw by cshogi over the cycle since the previous
occurrence, :func:`_judge_over`). A segment whose game the book does not know (never seen: the
learner restarted, or another learner read the earlier segments; forgotten: the book was full;
or a segment after a gap) is checked on its own, and what it could only prove with the history
the learner has not seen is not believed: a repetition or perpetual-check ending the replay does
not show is trained as a cut valued 0 (a draw's value; the worker's bootstrap could say as much),
and repetition counts above what the replay shows are lowered to it. Both are counted
(``unproven_endings``, ``repetition_clamped``); an honest segment is never refused for it. A
game's first segment (ply 0) must start from the initial position; every segment's side to move
must be the ply's (checked by the decoder).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cshogi
import numpy as np

from keisei_stream.shogi import EndReason, Verdict, judge, repetition_feature
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


#: Recorded positions a :class:`GameBook` keeps over all games (about 110 bytes each: a count
#: per Zobrist key, the key in game order, HCP, action; so at most about 60 MB), unless told otherwise.
GAME_BOOK_POSITIONS = 1 << 19
_REPETITION_ENDS = (EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK)
_NO_COUNTS: dict[int, int] = {}


def _initial_hcp() -> bytes:
    board, out = cshogi.Board(), np.empty(1, dtype=cshogi.HuffmanCodedPos)
    board.to_hcp(out)
    return out.tobytes()


#: HCP of the initial position: where every game's ply 0 is.
INITIAL_HCP = _initial_hcp()


@dataclass
class Trail:
    """What the learner has seen of one game in flight: its recorded positions so far and the
    position the next segment must start from.

    Attributes:
        ply: plies played before :attr:`after` (the next segment's first ply).
        after: HCP (32 bytes) of the position after the last recorded move.
        counts: cshogi Zobrist key -> occurrences among the recorded positions.
        keys, hcp, actions: per accepted segment (in game order) its positions' Zobrist keys
            (``list[int]``), HCPs (``(k, 32) uint8``) and actions (``(k,) uint16``): what the
            rare judgement of a repetition over segments replays (:func:`_judge_over`).
        complete: the first recorded position is the game's start (ply 0): the counts are exact.
        positions: recorded positions.
    """

    ply: int
    after: bytes
    counts: dict[int, int]
    keys: list[list[int]]
    hcp: list[np.ndarray]
    actions: list[np.ndarray]
    complete: bool
    positions: int

    def extend(self, ply: int, after: bytes, keys: list[int], hcp: np.ndarray, actions: np.ndarray) -> None:
        """Append a segment's positions (in place)."""
        for k in keys:
            self.counts[k] = self.counts.get(k, 0) + 1
        self.keys.append(keys)
        self.hcp.append(hcp)
        self.actions.append(actions)
        self.ply, self.after, self.positions = ply, after, self.positions + len(keys)

    def copy(self) -> "Trail":
        return Trail(self.ply, self.after, dict(self.counts), list(self.keys), list(self.hcp), list(self.actions),
                     self.complete, self.positions)


class GameBook:
    """The games in flight whose segments a consumer has accepted, per worker, in bounded memory.

    A game is forgotten when it ends, and the least recently continued game of the worker holding
    the most positions when all games together hold more than ``max_positions`` recorded positions
    (so one worker's flood of games forgets its own first). What :func:`replay_check` learns from
    an entry is staged until the owner :meth:`commit` s it (it keeps the entry) or
    :meth:`discard` s it (a duplicate, a refusal); the next check discards what was left staged.

    Args:
        max_positions: bound on the recorded positions kept (:data:`GAME_BOOK_POSITIONS`).

    Attributes:
        counts: worker -> counter of ``continued`` (segments that continued a known game),
            ``unknown`` (segments checked without their game's history), ``gaps`` (of those, a
            known game not continued at its next ply), ``forgotten`` (games dropped for room),
            ``unproven_endings`` and ``repetition_clamped`` (module doc).
    """

    def __init__(self, max_positions: int = GAME_BOOK_POSITIONS):
        self.max_positions = int(max_positions)
        self._games: dict[str, OrderedDict[int, Trail]] = {}
        self._held: Counter[str] = Counter()
        # (worker, game) -> ("end", None) | ("new", Trail) | ("extend", (trail, ply, after, keys, hcp, actions))
        self._staged: dict[tuple[str, int], tuple[str, Any]] = {}
        self._staged_counts: Counter[tuple[str, str]] = Counter()
        self.counts: dict[str, Counter[str]] = {}

    @property
    def positions(self) -> int:
        """Recorded positions held over all games."""
        return sum(self._held.values())

    def __len__(self) -> int:
        """Games held."""
        return sum(len(g) for g in self._games.values())

    def get(self, worker: str, game: int) -> Trail | None:
        """The trail of ``worker``'s game ``game`` as staged by the check in progress, else as
        committed; None when unknown (or ended)."""
        staged = self._staged.get((worker, game))
        if staged is None:
            return self._games.get(worker, {}).get(game)
        kind, value = staged
        if kind == "extend":  # a second segment of the game in one entry: a copy to extend (rare)
            trail, *segment = value
            value = trail.copy()
            value.extend(*segment)
            self._staged[(worker, game)] = ("new", value)
        return value

    def stage_end(self, worker: str, game: int) -> None:
        """Stage that the game ended (it is forgotten)."""
        self._staged[(worker, game)] = ("end", None)

    def stage_new(self, worker: str, game: int, trail: Trail) -> None:
        """Stage a trail that replaces what is known of the game."""
        self._staged[(worker, game)] = ("new", trail)

    def stage_extend(self, worker: str, game: int, trail: Trail, ply: int, after: bytes, keys: list[int],
                     hcp: np.ndarray, actions: np.ndarray) -> None:
        """Stage a segment continuing ``trail`` (the committed trail :meth:`get` returned)."""
        self._staged[(worker, game)] = ("extend", (trail, ply, after, keys, hcp, actions))

    def note(self, worker: str, name: str, n: int = 1) -> None:
        """Stage ``n`` more of counter ``name`` for ``worker``."""
        self._staged_counts[(worker, name)] += n

    def discard(self) -> None:
        """Forget what was staged."""
        self._staged.clear()
        self._staged_counts.clear()

    def commit(self) -> None:
        """Apply what was staged, then forget games while over ``max_positions``."""
        for (worker, game), (kind, value) in self._staged.items():
            games = self._games.setdefault(worker, OrderedDict())
            old = games.pop(game, None)
            if old is not None:
                self._held[worker] -= old.positions
            if kind == "extend":  # (the committed trail itself, or a copy a second segment made)
                value[0].extend(*value[1:])
                value = value[0]
            if kind != "end":
                games[game] = value
                self._held[worker] += value.positions
        for (worker, name), n in self._staged_counts.items():
            self.counts.setdefault(worker, Counter())[name] += n
        self.discard()
        while self.positions > self.max_positions:
            worker = max(self._held, key=self._held.__getitem__)
            _game, trail = self._games[worker].popitem(last=False)
            self._held[worker] -= trail.positions
            self.counts.setdefault(worker, Counter())["forgotten"] += 1

    def forget_worker(self, worker: str) -> None:
        """Drop every game of ``worker`` (its stream was reset)."""
        self._games.pop(worker, None)
        self._held.pop(worker, None)


def _judge_over(hcp: np.ndarray, actions: np.ndarray, keys: np.ndarray, count: int, ply: int, max_plies: int,
                has_legal_move: bool) -> Verdict:
    """The referee's verdict on the last of a game's positions ``hcp`` (``(T+1, 32) uint8``, the
    positions before each of ``actions`` ``(T,)`` and the one after the last; ``keys`` their
    Zobrist keys), seen ``count`` >= 4 times, at ``ply``: cshogi replays from the previous
    occurrence of that position, which is all ``Board.is_draw()`` reads to tell a perpetual check
    (one side checked on every move of the cycle) from a draw."""
    t = len(keys) - 1
    j = int(np.flatnonzero(keys[:t] == keys[t])[-1])
    board = cshogi.Board()
    board.set_hcp(np.frombuffer(hcp[j].tobytes(), dtype=cshogi.HuffmanCodedPos))
    turn = (hcp[j:t, 0] & 1).astype(np.int64)
    for code in _ACTION_TO_KEY[turn, actions[j:t].astype(np.int64)].tolist():
        board.push(board.move_from_move16(code))
    return judge(board, count, ply, max_plies, has_legal_move)


def replay_check(batch: ExperienceBatch, max_plies: int, games: GameBook | None = None, worker: str = "") -> None:
    """Replay every segment with cshogi from its first position and check it against the recorded
    data and, with ``games``, against the game's earlier segments (module doc).

    For each segment: a game's first segment (ply 0) starts from the initial position; a segment
    continuing a game ``games`` knows starts from the position after its previous segment's last
    move; the first position must pass :func:`validate_hcp` and the side not to move must not be in
    check; then the segment is replayed move by move under the one referee
    (:func:`keisei_stream.shogi.judge`, as ``VecEnv`` plays, with the occurrences counted over the
    game's known history): every action must be among cshogi's legal moves of the replayed board,
    the replayed board's HCP must equal the recorded one, the game must not have ended before the
    last move (a 4th occurrence included), and after it the referee's verdict (reason and result)
    must be the recorded one: the game's end, or for a cut segment (reason ``NONE``) no end.
    Repetition features must match the counts over the game's history exactly when it is known
    from ply 0, and may not be lower otherwise. What the segment's own replay cannot prove without
    unseen history is neutralised in ``batch`` (module doc) once every segment passed: a recorded
    repetition or perpetual-check ending the referee does not see becomes a cut valued 0 (reason
    ``NONE``, result, bootstrap and bootstrap advantage 0; a perpetual check still needs the check
    it implies: the side to move in check after a winning checker's move, the last mover in check
    before a losing checker's), and a repetition feature above the replay's is lowered to it.

    Cost: about 5-12 us per position (one legal-move generation each), plus ~0.2 ms per batch;
    following the games adds two dictionary lookups per position and a few microseconds per
    segment (``benchmarks/validation.py``).

    Args:
        batch: a batch whose structure and values ``decode_entry`` has already checked (offsets,
            action range, plies consecutive and of the side to move); ``hcp`` is ``(P, 32) uint8``.
        max_plies: the run's ``env.max_plies`` (the ply limit itself is checked by the decoder).
        games: the games in flight (staged, see :class:`GameBook`); None: every segment is checked
            as one whose game's history is unknown (ply-0 segments exactly).
        worker: whose games (the book's key; the stream's worker).

    Raises:
        BadEntry: on the first inconsistency (nothing is changed in ``batch``).
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
    actions = batch.action.astype(np.int64)
    move_keys = _ACTION_TO_KEY[turn, actions].tolist()
    replayed = np.empty(p, dtype=cshogi.HuffmanCodedPos)
    total: list[int] = []  # occurrences of each position in its game so far, as far as known
    exact = np.zeros(p, bool)  # ... known from the game's start
    neutralise: list[int] = []
    board = cshogi.Board()
    flipped = np.empty(1, dtype=cshogi.HuffmanCodedPos)
    after = np.empty(1, dtype=cshogi.HuffmanCodedPos)
    reasons = batch.reason.tolist()
    results = batch.result.tolist()
    plies = batch.ply.tolist()
    for g in range(batch.num_segments):
        s, e = int(off[g]), int(off[g + 1])
        game = int(batch.game[g])
        trail = games.get(worker, game) if games is not None else None
        if plies[s] == 0:
            if hcp[s].tobytes() != INITIAL_HCP:
                raise BadEntry(f"segment {g}: its game's first position (ply 0) is not the initial position")
            trail = None
            complete = True
        elif trail is not None and trail.ply == plies[s]:
            if trail.after != hcp[s].tobytes():
                raise BadEntry(f"segment {g}: does not continue game {game}: its first position (ply {plies[s]}) is "
                               f"not the position after the previous segment's last move")
            complete = trail.complete
            games.note(worker, "continued")
        else:
            if games is not None:
                games.note(worker, "unknown")
                if trail is not None:
                    games.note(worker, "gaps")
            trail, complete = None, False
        prior = trail.counts if trail is not None else _NO_COUNTS
        flipped.view(np.uint8)[:] = hcp[s]
        flipped.view(np.uint8)[0] ^= 1
        board.set_hcp(flipped)
        if board.is_check():
            raise BadEntry(f"segment {g}: the side not to move is in check at the start")
        board.set_hcp(hv[s:s + 1])
        key = board.zobrist_hash()
        keys = [key]
        seen = {key: 1}
        c = 1 + prior.get(key, 0)
        counts = [c]
        legal = list(board.legal_moves)
        verdict = judge(board, c, plies[s], max_plies, bool(legal))
        checked_before_last = False
        local = 1
        for t in range(s, e):
            if verdict.reason:
                raise BadEntry(f"position {t}: the game had already ended ({verdict.reason.name})")
            board.to_hcp(replayed[t:t + 1])
            mv = board.move_from_move16(move_keys[t])
            if mv not in legal:
                raise BadEntry(f"action {int(batch.action[t])} at position {t} is not legal")
            if t == e - 1:
                checked_before_last = board.is_check()
            board.push(mv)
            legal = list(board.legal_moves)
            key = board.zobrist_hash()
            local = seen.get(key, 0) + 1
            seen[key] = local
            c = local + prior.get(key, 0)
            keys.append(key)
            counts.append(c)
            verdict = judge(board, c, plies[t] + 1, max_plies, bool(legal))
        after_row = _hcp_row(board, after)
        if c >= 4 and local < 4 and verdict.reason != EndReason.CHECKMATE:
            # a 4th occurrence that only the earlier segments show: cshogi judges it over them
            verdict = _judge_over(np.concatenate([*trail.hcp, hcp[s:e], after_row]),
                                  np.concatenate([*trail.actions, actions[s:e]]),
                                  np.array([k for chunk in trail.keys for k in chunk] + keys, dtype=np.uint64),
                                  c, plies[e - 1] + 1, max_plies, bool(legal))
        total += counts[:-1]
        exact[s:e] = complete
        want = EndReason(reasons[g])
        if not (verdict.reason == want and verdict.result(board.turn) == results[g]):
            if complete or want not in _REPETITION_ENDS or verdict.reason not in (
                    EndReason.NONE, EndReason.ENTERING_KING, EndReason.MAX_PLIES):
                raise BadEntry(f"segment {g}: recorded {want.name} result {results[g]}, the referee says "
                               f"{verdict.reason.name} result {verdict.result(board.turn)}")
            if want == EndReason.PERPETUAL_CHECK:  # the check a perpetual check implies, history or not
                mover_won = results[g] * (1 - 2 * int(turn[e - 1])) > 0
                if mover_won and not checked_before_last:
                    raise BadEntry(f"segment {g}: PERPETUAL_CHECK won by the last mover, who was not in check")
                if not mover_won and not board.is_check():
                    raise BadEntry(f"segment {g}: PERPETUAL_CHECK lost by the last mover, whose move gave no check")
            neutralise.append(g)
        if games is not None:
            if want != EndReason.NONE:
                games.stage_end(worker, game)
                continue
            recorded = keys[:-1]
            seg_hcp, seg_actions = hcp[s:e].copy(), batch.action[s:e].astype(np.uint16)
            if trail is None:
                seen[keys[-1]] -= 1  # the counts of the recorded positions, the one after left out
                if not seen[keys[-1]]:
                    del seen[keys[-1]]
                games.stage_new(worker, game, Trail(plies[e - 1] + 1, after_row.tobytes(), seen, [recorded],
                                                    [seg_hcp], [seg_actions], complete, len(recorded)))
            else:
                games.stage_extend(worker, game, trail, plies[e - 1] + 1, after_row.tobytes(), recorded, seg_hcp,
                                   seg_actions)
    rows = replayed.view(np.uint8).reshape(p, 32)
    if not np.array_equal(rows, hcp):
        bad = np.flatnonzero((rows != hcp).any(axis=1))[0]
        raise BadEntry(f"position {int(bad)} is not the previous position after its action")
    computed = repetition_feature(np.array(total, dtype=np.int64))
    recorded_rep = batch.repetition.astype(np.int64)
    if ((exact & (recorded_rep != computed)) | (~exact & (recorded_rep < computed))).any():
        raise BadEntry("repetition: counts inconsistent with the replayed game")
    # everything passed: neutralise what could not be proven (module doc)
    clamped = ~exact & (recorded_rep > computed)
    if clamped.any():
        batch.repetition[clamped] = computed[clamped].astype(batch.repetition.dtype)
    for g in neutralise:
        batch.reason[g] = EndReason.NONE
        batch.result[g] = 0
        batch.bootstrap[g] = 0.0
        batch.bootstrap_advantage[g] = 0.0
    if games is not None:
        if neutralise:
            games.note(worker, "unproven_endings", len(neutralise))
        if clamped.any():
            games.note(worker, "repetition_clamped", int(clamped.sum()))


def _hcp_row(board: cshogi.Board, out: np.ndarray) -> np.ndarray:
    """``(1, 32) uint8``: the HCP of ``board``'s position (written into ``out``, a ``(1,)``
    HuffmanCodedPos array)."""
    board.to_hcp(out)
    return out.view(np.uint8).reshape(1, 32).copy()
