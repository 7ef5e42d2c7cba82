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
from typing import TYPE_CHECKING

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
    """Lookup tables indexed by the next 8 bits of the stream, ``(256,) int16`` each: the kind of
    the board code they start with (-2 invalid, -1 empty square, else P L N S G B R index) and its
    length, the kind of the hand code they start with (-1 invalid, else P L N S G B R index, either
    side) and its length (0 for an invalid code)."""
    board_kind = np.full(256, -2, np.int16)
    board_len = np.zeros(256, np.int16)
    for pc, (code, nbits) in _BOARD_CODES.items():
        for w in range(256):
            if w & ((1 << nbits) - 1) == code:
                board_kind[w] = -1 if pc == 0 else _TYPE_KIND[pc & 15]
                board_len[w] = nbits
    hand_kind = np.full(256, -1, np.int16)
    hand_len = np.zeros(256, np.int16)
    for kind, codes in enumerate(_HAND_CODES):
        for code, nbits in codes:
            for w in range(256):
                if w & ((1 << nbits) - 1) == code:
                    hand_kind[w] = kind
                    hand_len[w] = nbits
    return board_kind, board_len, hand_kind, hand_len


_BOARD_KIND, _BOARD_LEN, _HAND_KIND, _HAND_LEN = _hcp_tables()
#: Bit positions a code can start at: codes start below bit 256 in an HCP that cshogi can load;
#: past it the bits read are zeros, one-bit empty squares, for at most the 79 squares left.
_READ_BITS = 256 + 8 + 79


def validate_hcp(hcp: np.ndarray) -> np.ndarray:
    """Which HCPs cshogi can load safely: ``(M, 32) uint8 -> (M,) bool``.

    True when the bits decode as Apery's format does, ending exactly at bit 256, with both king
    squares < 81 and distinct, and exactly the standard piece set (18 P, 4 L, 4 N, 4 S, 4 G,
    2 B, 2 R counting promoted pieces as their base kind, board and hands together). cshogi's
    ``Board.set_hcp`` does no such checks and can crash the process on malformed input.
    Vectorised over positions: the reader reads every position's next code at once, 79 board
    codes (the squares but the kings') then the hand codes until every position is at bit 256
    (or past it, or stuck on an invalid code), at most 40 (a set has 38 pieces besides the kings).
    """
    hcp = np.ascontiguousarray(hcp, dtype=np.uint8)
    m = hcp.shape[0]
    if m == 0:
        return np.zeros(0, bool)
    padded = np.zeros((m, _READ_BITS // 8 + 2), np.uint8)
    padded[:, :32] = hcp
    pairs = padded[:, :-1].astype(np.uint16) | (padded[:, 1:].astype(np.uint16) << 8)
    at = np.arange(_READ_BITS)
    # the 8 bits from each bit position on (least significant first, as Apery reads), flat: row
    # i's bit p is at i * _READ_BITS + p
    window = ((pairs[:, at >> 3] >> (at & 7).astype(np.uint16)) & 255).ravel()
    row = np.arange(m) * _READ_BITS
    bk = hcp[:, 0].astype(np.int16) >> 1  # bits 1..7
    wk = hcp[:, 1].astype(np.int16) & 127  # bits 8..14
    bad = (bk >= 81) | (wk >= 81) | (bk == wk)
    ptr = row + 15  # the board's codes start at bit 15
    board = np.empty((79, m), np.uint16)  # the 8 bits each square's code starts with
    for square in range(79):
        board[square] = window[ptr]
        ptr = ptr + _BOARD_LEN[board[square]]  # an invalid code (length 0) does not advance
    kinds = [_BOARD_KIND[board]]
    bad |= (kinds[0] == -2).any(axis=0) | (ptr - row > 256)  # (Apery's reader would run past the 32 bytes)
    for _ in range(40):
        reading = ptr - row < 256
        if not reading.any():
            break
        w = window[ptr]
        kinds.append(np.where(reading, _HAND_KIND[w], -1)[None])
        ptr = ptr + np.where(reading, _HAND_LEN[w], 0)
    bad |= ptr - row != 256  # past the end, stuck on an invalid code, or more than 40 hand codes
    # pieces of each kind, board and hands: kinds -2..6 counted per position, 9 columns each
    counted = np.concatenate(kinds) + 2 + 9 * np.arange(m)
    total = np.bincount(counted.ravel(), minlength=9 * m).reshape(m, 9)[:, 2:]
    bad |= (total != PIECE_SET).any(axis=1)
    return ~bad


#: Recorded positions a :class:`GameBook` keeps over all games (about 70 bytes each: a count per
#: Zobrist key and the action, measured with tracemalloc on quickstart self-play; so at most about
#: 40 MB), unless told otherwise.
GAME_BOOK_POSITIONS = 1 << 19
_REPETITION_ENDS = (EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK)


def _initial_hcp() -> bytes:
    board, out = cshogi.Board(), np.empty(1, dtype=cshogi.HuffmanCodedPos)
    board.to_hcp(out)
    return out.tobytes()


#: HCP of the initial position: where every game's ply 0 is.
INITIAL_HCP = _initial_hcp()


@dataclass
class Trail:
    """What the learner has seen of one game in flight: its recorded positions so far and the
    position the next segment must start from. A segment that continues the game makes a new
    trail (the old one is never changed, so a refused entry leaves nothing behind).

    Attributes:
        ply: plies played before :attr:`after` (the next segment's first ply).
        after: HCP (32 bytes) of the position after the last recorded move.
        counts: cshogi Zobrist key -> occurrences among the recorded positions and :attr:`after`
            (the next segment's first position, counted once).
        start: HCP (32 bytes) of the first recorded position.
        actions: the recorded positions' actions in game order (``uint16`` little-endian, 2 bytes
            each): from :attr:`start`, the moves the rare judgement of a repetition over segments
            replays (:func:`_judge_over`).
        complete: the first recorded position is the game's start (ply 0): the counts are exact.
    """

    ply: int
    after: bytes
    counts: dict[int, int]
    start: bytes
    actions: bytes
    complete: bool

    @property
    def positions(self) -> int:
        """Recorded positions."""
        return len(self.actions) // 2


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
        self._staged: dict[tuple[str, int], Trail | None] = {}  # (worker, game) -> its new trail; None: ended
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
        if (worker, game) in self._staged:
            return self._staged[(worker, game)]
        return self._games.get(worker, {}).get(game)

    def stage(self, worker: str, game: int, trail: Trail | None) -> None:
        """Stage the game's new trail (it replaces what is known of the game), or None: the game
        ended (it is forgotten)."""
        self._staged[(worker, game)] = trail

    def note(self, worker: str, name: str, n: int = 1) -> None:
        """Stage ``n`` more of counter ``name`` for ``worker``."""
        self._staged_counts[(worker, name)] += n

    def discard(self) -> None:
        """Forget what was staged."""
        self._staged.clear()
        self._staged_counts.clear()

    def commit(self) -> None:
        """Apply what was staged, then forget games while over ``max_positions``."""
        for (worker, game), trail in self._staged.items():
            if worker not in self._games:
                self._games[worker] = OrderedDict()
            games = self._games[worker]
            old = games.pop(game, None)
            if old is not None:
                self._held[worker] -= old.positions
            if trail is not None:
                games[game] = trail
                self._held[worker] += trail.positions
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


def _judge_over(trail: Trail, actions: bytes, count: int, ply: int, max_plies: int,
                has_legal_move: bool) -> Verdict:
    """The referee's verdict on the position after ``actions`` (a segment's, as in
    :attr:`Trail.actions`, continuing ``trail``), seen ``count`` >= 4 times in the game, at
    ``ply``: cshogi replays the recorded game from the trail's first position, so that
    ``Board.is_draw()`` sees the cycle since the previous occurrence, which is all it reads to tell
    a perpetual check (one side checked on every move of the cycle) from a draw."""
    moves = np.frombuffer(trail.actions + actions, dtype="<u2").astype(np.int64)
    board = cshogi.Board()
    board.set_hcp(np.frombuffer(trail.start, dtype=cshogi.HuffmanCodedPos))
    turn = (np.arange(len(moves)) + (trail.start[0] & 1)) & 1  # the sides alternate from the start's
    for code in _ACTION_TO_KEY[turn, moves].tolist():
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

    Cost: one legal-move generation per position; with the decoder, about 3.5 us per position of
    quickstart self-play on a 2-core x86 VM, of which following the games (a copy of the game's
    counts per segment, one C-level dictionary clone, and a few microseconds per segment) about
    0.1 us (``benchmarks/validation.py``).

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
    move_keys = _ACTION_TO_KEY[turn, batch.action.astype(np.int64)].tolist()
    replayed = np.empty(p, dtype=cshogi.HuffmanCodedPos)
    rep = [0] * p  # occurrences of each position in its game so far, as far as known
    exact = np.zeros(p, bool)  # ... known from the game's start
    neutralise: list[int] = []
    noted: Counter[str] = Counter()  # the book's counters (GameBook.counts), staged once all passed
    board = cshogi.Board()
    flipped = np.empty(1, dtype=cshogi.HuffmanCodedPos)
    after = np.empty(1, dtype=cshogi.HuffmanCodedPos)
    reasons = batch.reason.tolist()
    results = batch.result.tolist()
    plies = batch.ply.tolist()
    game_ids = batch.game.tolist()
    offsets = off.tolist()
    hcp_bytes = hcp.tobytes()  # 32 bytes a position
    action_bytes = batch.action.astype("<u2").tobytes()  # 2 bytes a position (Trail.actions)
    for g in range(batch.num_segments):
        s, e = offsets[g], offsets[g + 1]
        game = game_ids[g]
        first = hcp_bytes[32 * s:32 * s + 32]
        trail = games.get(worker, game) if games is not None else None
        if plies[s] == 0:
            if first != INITIAL_HCP:
                raise BadEntry(f"segment {g}: its game's first position (ply 0) is not the initial position")
            trail = None
            complete = True
        elif trail is not None and trail.ply == plies[s]:
            if trail.after != first:
                raise BadEntry(f"segment {g}: does not continue game {game}: its first position (ply {plies[s]}) is "
                               f"not the position after the previous segment's last move")
            complete = trail.complete
            noted["continued"] += 1
        else:
            noted["unknown"] += 1
            if trail is not None:
                noted["gaps"] += 1
            trail, complete = None, False
        flipped.view(np.uint8)[:] = hcp[s]
        flipped.view(np.uint8)[0] ^= 1
        board.set_hcp(flipped)
        if board.is_check():
            raise BadEntry(f"segment {g}: the side not to move is in check at the start")
        board.set_hcp(hv[s:s + 1])
        key = board.zobrist_hash()
        counts = dict(trail.counts) if trail is not None else {key: 1}  # occurrences in the game so far
        c = counts[key]
        legal = list(board.legal_moves)
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
            key = board.zobrist_hash()
            c = counts.get(key, 0) + 1
            counts[key] = c
            verdict = judge(board, c, plies[t] + 1, max_plies, bool(legal))
        if c >= 4 and trail is not None and verdict.reason != EndReason.CHECKMATE:
            # a 4th occurrence the earlier segments may hold: cshogi judges it over the recorded game
            verdict = _judge_over(trail, action_bytes[2 * s:2 * e], c, plies[e - 1] + 1, max_plies, bool(legal))
        exact[s:e] = complete
        want = EndReason(reasons[g])
        if not (verdict.reason == want and verdict.result(board.turn) == results[g]):
            if complete or want not in _REPETITION_ENDS or verdict.reason not in (
                    EndReason.NONE, EndReason.ENTERING_KING, EndReason.MAX_PLIES):
                raise BadEntry(f"segment {g}: recorded {want.name} result {results[g]}, the referee says "
                               f"{verdict.reason.name} result {verdict.result(board.turn)}")
            if want == EndReason.PERPETUAL_CHECK:  # the check a perpetual check implies, history or not
                mover_won = results[g] * (1 - 2 * int(turn[e - 1])) > 0
                if mover_won and not _in_check(replayed[e - 1:e]):
                    raise BadEntry(f"segment {g}: PERPETUAL_CHECK won by the last mover, who was not in check")
                if not mover_won and not board.is_check():
                    raise BadEntry(f"segment {g}: PERPETUAL_CHECK lost by the last mover, whose move gave no check")
            neutralise.append(g)
        if games is not None:
            if want != EndReason.NONE:
                games.stage(worker, game, None)  # the game ended: forgotten
                continue
            board.to_hcp(after)
            start, earlier = (trail.start, trail.actions) if trail is not None else (first, b"")
            games.stage(worker, game, Trail(plies[e - 1] + 1, after.tobytes(), counts, start,
                                            earlier + action_bytes[2 * s:2 * e], complete))
    rows = replayed.view(np.uint8).reshape(p, 32)
    if not np.array_equal(rows, hcp):
        bad = np.flatnonzero((rows != hcp).any(axis=1))[0]
        raise BadEntry(f"position {int(bad)} is not the previous position after its action")
    computed = repetition_feature(np.array(rep, dtype=np.int64))
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
        noted["unproven_endings"] += len(neutralise)
        noted["repetition_clamped"] += int(clamped.sum())
        for name, n in noted.items():
            if n:
                games.note(worker, name, n)


def _in_check(position: np.ndarray) -> bool:
    """Whether the side to move is in check in ``position`` (a ``(1,)`` HuffmanCodedPos array
    cshogi wrote)."""
    board = cshogi.Board()
    board.set_hcp(position)
    return board.is_check()
