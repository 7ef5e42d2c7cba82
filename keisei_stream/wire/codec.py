"""Wire codec of experience batches: one batch of complete games = one Redis stream entry.

Stream entry fields (DESIGN.md, "Wire format")::

    d  bytes  lz4 block (4-byte little-endian uncompressed size + data) of a msgpack map
    w  str    worker id
    v  int    newest model version used in the batch
    n  int    positions in the batch (P)
    s  int    schema version (SCHEMA_VERSION)

The msgpack map (string keys, exactly these)::

    batch_id      str    unique per (worker, producer session, sequence number)
    schema        int    SCHEMA_VERSION
    hcp           bytes  (P, 32) uint8   cshogi HuffmanCodedPos of the position before the move
    ply           bytes  (P,)  <u2       plies played before the position (0 = game start)
    repetition    bytes  (P,)  u1        earlier occurrences of the position in the game (0..2)
    action        bytes  (P,)  <u2       action index played (keisei_stream.shogi, < 13527)
    log_prob      bytes  (P,)  <f4       behaviour log-probability of the action (finite, <= 0)
    value         bytes  (P,)  <f4       behaviour value estimate, side to move's view, [-1, 1]
    version       bytes  (P,)  <u4       model version that chose the action
    game_offsets  bytes  (G+1,) <u4      game g = positions [off[g], off[g+1]); 0 .. P, increasing
    result        bytes  (G,)  i1        +1 Black won, -1 White won, 0 draw
    reason        bytes  (G,)  u1        keisei_stream.shogi.EndReason code (1..5 in self-play)

That is 49 bytes per position before compression plus 6 per game; lz4 brings batches of
random-play games with random float32 values/log-probs to ~24 bytes per position on the wire
(``benchmarks/codec.py``; consecutive HCPs share most bytes), well under the 100-byte target. ``value`` stays float32: float16 would save 2 bytes per position (~4%) at a
relative error of 5e-4, not worth a second dtype in the learner.

:func:`decode_entry` validates everything before any of it reaches training and raises
:class:`BadEntry` (one exception type, with a short ``reason``) for any problem; it never
raises anything else on hostile bytes and never hands cshogi a position that could crash it
(cshogi's ``set_hcp`` segfaults on malformed Huffman codes, so every HCP that reaches cshogi
has first passed :func:`validate_hcp`, a NumPy re-implementation of Apery's decoder).
No pickle anywhere; this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import lz4.block
import msgpack
import numpy as np

#: Schema version of the msgpack map (field ``s`` and key ``schema``).
SCHEMA_VERSION = 1
#: Action space size (``keisei_stream.shogi.NUM_ACTIONS``; kept here so that the structural
#: checks need no cshogi import).
NUM_ACTIONS = 13527
#: Most positions one entry may carry.
MAX_POSITIONS = 1 << 20
#: Most bytes of field ``d``.
MAX_COMPRESSED_BYTES = 64 << 20
#: Longest batch id / worker id accepted.
MAX_ID_CHARS = 200
#: ``log_prob`` may exceed 0 by this much (float32 rounding of log-softmax of a forced move).
LOG_PROB_TOLERANCE = 1e-4
#: ``|value|`` may exceed 1 by this much (float32 rounding).
VALUE_TOLERANCE = 1e-6

# EndReason codes (keisei_stream.shogi.EndReason); only these end self-play games.
CHECKMATE, REPETITION_DRAW, PERPETUAL_CHECK, ENTERING_KING, MAX_PLIES = 1, 2, 3, 4, 5
_SELF_PLAY_REASONS = (CHECKMATE, REPETITION_DRAW, PERPETUAL_CHECK, ENTERING_KING, MAX_PLIES)

# name -> (wire dtype, row shape, length kind) with kind "P" (positions), "G" (games), "G1" (G+1)
ARRAY_SPECS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "hcp": ("|u1", (32,), "P"),
    "ply": ("<u2", (), "P"),
    "repetition": ("|u1", (), "P"),
    "action": ("<u2", (), "P"),
    "log_prob": ("<f4", (), "P"),
    "value": ("<f4", (), "P"),
    "version": ("<u4", (), "P"),
    "game_offsets": ("<u4", (), "G1"),
    "result": ("|i1", (), "G"),
    "reason": ("|u1", (), "G"),
}
_NATIVE = {"hcp": np.uint8, "ply": np.uint16, "repetition": np.uint8, "action": np.uint16,
           "log_prob": np.float32, "value": np.float32, "version": np.uint32,
           "game_offsets": np.uint32, "result": np.int8, "reason": np.uint8}
_MAP_KEYS = frozenset(("batch_id", "schema", *ARRAY_SPECS))
_FIELD_KEYS = frozenset((b"d", b"w", b"v", b"n", b"s"))
_BYTES_PER_POSITION = 49  # sum of the per-position itemsizes above
_MAX_MAP_OVERHEAD = 1024 + 2 * MAX_ID_CHARS * 4


class BadEntry(ValueError):
    """A stream entry that must not reach training; ``reason`` says why (short, bounded)."""

    def __init__(self, reason: str):
        reason = str(reason)
        if len(reason) > 300:
            reason = reason[:297] + "..."
        super().__init__(reason)
        self.reason = reason


@dataclass
class ExperienceBatch:
    """Complete self-play games of one worker (P positions in G games).

    Attributes:
        batch_id: unique id (``Producer.send`` sets it to ``{worker}:{session}:{seq}``).
        worker_id: the producing worker.
        hcp: ``(P, 32) uint8`` cshogi HuffmanCodedPos of each position (before its move).
        ply: ``(P,) uint16`` plies played before the position (consecutive within a game).
        repetition: ``(P,) uint8`` earlier occurrences of the position (observation plane 44).
        action: ``(P,) uint16`` action index played (mover's frame, < 13527).
        log_prob: ``(P,) float32`` behaviour log-probability of ``action`` (nats, <= 0).
        value: ``(P,) float32`` behaviour value, side to move's view, in [-1, 1].
        version: ``(P,) uint32`` model version that chose the action.
        game_offsets: ``(G+1,) uint32``; game g is positions ``off[g]:off[g+1]``.
        result: ``(G,) int8`` +1 Black won, -1 White won, 0 draw.
        reason: ``(G,) uint8`` EndReason code.
    """

    batch_id: str
    worker_id: str
    hcp: np.ndarray
    ply: np.ndarray
    repetition: np.ndarray
    action: np.ndarray
    log_prob: np.ndarray
    value: np.ndarray
    version: np.ndarray
    game_offsets: np.ndarray
    result: np.ndarray
    reason: np.ndarray

    @property
    def num_positions(self) -> int:
        """P."""
        return int(self.action.shape[0])

    @property
    def num_games(self) -> int:
        """G."""
        return int(self.game_offsets.shape[0]) - 1

    @property
    def newest_version(self) -> int:
        """Largest ``version`` (the entry's ``v`` field); 0 for an empty batch."""
        return int(self.version.max()) if self.version.size else 0

    def turns(self) -> np.ndarray:
        """``(P,) uint8`` side to move of each position (0 Black, 1 White): bit 0 of the HCP."""
        return (self.hcp[:, 0] & 1).astype(np.uint8)

    def final_rewards(self) -> np.ndarray:
        """``(G,) float32`` reward of the last mover of each game: +1 won, -1 lost, 0 draw.

        ``result`` is from Black's view; the last mover is the side to move of each game's last
        position, so the reward is ``result`` for Black and ``-result`` for White.
        """
        last = self.game_offsets[1:].astype(np.int64) - 1
        sign = 1.0 - 2.0 * (self.hcp[last, 0] & 1).astype(np.float32)
        return (self.result.astype(np.float32) * sign).astype(np.float32)

    def game_index(self) -> np.ndarray:
        """``(P,) int64`` game of each position."""
        return np.repeat(np.arange(self.num_games, dtype=np.int64), np.diff(self.game_offsets.astype(np.int64)))


# --------------------------------------------------------------------------------------------
# encode


def encode_batch(batch: ExperienceBatch) -> dict[str, bytes | str | int]:
    """Encode ``batch`` into the stream fields ``{d, w, v, n, s}``.

    Raises:
        ValueError: when an array has the wrong length or shape (a bug in the caller).
    """
    p = batch.num_positions
    g = batch.num_games
    payload: dict[str, Any] = {"batch_id": str(batch.batch_id), "schema": SCHEMA_VERSION}
    for name, (dtype, row, kind) in ARRAY_SPECS.items():
        arr = np.ascontiguousarray(getattr(batch, name), dtype=np.dtype(dtype))
        n = p if kind == "P" else g if kind == "G" else g + 1
        if arr.shape != (n, *row):
            raise ValueError(f"{name}: shape {arr.shape}, expected {(n, *row)}")
        payload[name] = arr.tobytes()
    raw = msgpack.packb(payload, use_bin_type=True)
    return {
        "d": lz4.block.compress(raw, store_size=True),
        "w": str(batch.worker_id),
        "v": batch.newest_version,
        "n": p,
        "s": SCHEMA_VERSION,
    }


# --------------------------------------------------------------------------------------------
# decode


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x).encode()
    raise BadEntry(f"field of type {type(x).__name__}")


def _parse_uint(raw: bytes, name: str, limit: int) -> int:
    if not (0 < len(raw) <= 12) or not raw.isdigit():
        raise BadEntry(f"field {name}: not a decimal integer: {raw[:24]!r}")
    value = int(raw)
    if value > limit:
        raise BadEntry(f"field {name}: {value} > {limit}")
    return value


def entry_positions(fields: Mapping[Any, Any]) -> int:
    """Positions an entry claims (field ``n``), or 0 when absent or invalid. Never raises."""
    try:
        for k, v in fields.items():
            if _as_bytes(k) == b"n":
                return _parse_uint(_as_bytes(v), "n", MAX_POSITIONS)
    except Exception:  # noqa: BLE001 - hostile input: any failure means "unknown"
        return 0
    return 0


def decode_entry(fields: Mapping[Any, Any], *, max_plies: int, check_legal: bool = True) -> ExperienceBatch:
    """Decode and validate one stream entry.

    Args:
        fields: the entry's field map as redis-py returns it (``dict[bytes, bytes]``; ``str`` keys
            and values are accepted too).
        max_plies: the run's ``env.max_plies`` (plies must be below it; MAX_PLIES games end on it).
        check_legal: also replay every game with cshogi: each action must be legal in its
            position, each position must be the previous one after its action, a CHECKMATE game's
            last move must mate, an ENTERING_KING game's must leave a declarable position, a
            repetition game must end in a repetition (games starting at ply 0), and no other game
            may end in a position without legal moves (about 3 us per position). Without it the
            positions are still checked to be well-formed HCPs that cshogi can load safely.

    Returns:
        The :class:`ExperienceBatch` (owned, writable, native-endian arrays).

    Raises:
        BadEntry: for anything wrong: missing or extra fields, non-integer ``v``/``n``/``s``,
            wrong schema, lz4 errors, a claimed decompressed size above ``56 * n + 2 KiB`` (refused
            before allocating), msgpack errors, missing/extra/mistyped map keys, array byte
            lengths inconsistent with ``n`` and the game offsets, non-monotone offsets,
            actions >= 13527, non-finite or positive log-probabilities, values outside [-1, 1],
            versions inconsistent with ``v``, non-consecutive plies, plies >= ``max_plies``,
            results inconsistent with the end reason, malformed positions, and (``check_legal``)
            illegal actions or inconsistent positions.
    """
    try:
        return _decode(fields, max_plies, check_legal)
    except BadEntry:
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: hostile input never crashes
        raise BadEntry(f"undecodable entry: {type(exc).__name__}: {str(exc)[:120]}") from None


def _decode(fields: Mapping[Any, Any], max_plies: int, check_legal: bool) -> ExperienceBatch:
    if not isinstance(fields, Mapping):
        raise BadEntry(f"fields of type {type(fields).__name__}")
    if len(fields) > 16:
        raise BadEntry(f"{len(fields)} fields, expected 5")
    f: dict[bytes, bytes] = {}
    for k, v in fields.items():
        f[_as_bytes(k)] = _as_bytes(v)
    keys = set(f)
    if keys != _FIELD_KEYS:
        missing = sorted(k.decode("ascii", "replace") for k in _FIELD_KEYS - keys)
        extra = sorted(k[:16].decode("ascii", "replace") for k in keys - _FIELD_KEYS)
        raise BadEntry(f"fields: missing {missing} extra {extra}")
    schema = _parse_uint(f[b"s"], "s", 1 << 30)
    if schema != SCHEMA_VERSION:
        raise BadEntry(f"schema {schema}, expected {SCHEMA_VERSION}")
    n = _parse_uint(f[b"n"], "n", MAX_POSITIONS)
    if n == 0:
        raise BadEntry("field n: empty batch")
    v = _parse_uint(f[b"v"], "v", 0xFFFFFFFF)
    try:
        worker = f[b"w"].decode("utf-8")
    except UnicodeDecodeError:
        raise BadEntry("field w: not UTF-8") from None
    if not worker or len(worker) > MAX_ID_CHARS:
        raise BadEntry("field w: empty or too long")

    raw = _decompress(f[b"d"], n)
    try:
        payload = msgpack.unpackb(
            raw, raw=False, use_list=False, strict_map_key=True, max_str_len=MAX_ID_CHARS * 4,
            max_bin_len=len(raw), max_array_len=0, max_map_len=len(_MAP_KEYS), max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types
        raise BadEntry(f"msgpack: {type(exc).__name__}: {str(exc)[:80]}") from None
    if not isinstance(payload, dict):
        raise BadEntry(f"msgpack: top level is {type(payload).__name__}, expected map")
    pkeys = set(payload)
    if pkeys != _MAP_KEYS:
        raise BadEntry(f"map keys: missing {sorted(_MAP_KEYS - pkeys)} extra {sorted(str(k)[:16] for k in pkeys - _MAP_KEYS)[:5]}")
    batch_id = payload["batch_id"]
    if not isinstance(batch_id, str) or not batch_id or len(batch_id) > MAX_ID_CHARS:
        raise BadEntry("batch_id: not a non-empty string of <= 200 chars")
    if type(payload["schema"]) is not int or payload["schema"] != SCHEMA_VERSION:
        raise BadEntry(f"map schema {str(payload['schema'])[:20]}, expected {SCHEMA_VERSION}")

    blobs = {}
    for name in ARRAY_SPECS:
        b = payload[name]
        if not isinstance(b, bytes):
            raise BadEntry(f"{name}: {type(b).__name__}, expected bytes")
        blobs[name] = b
    go_len = len(blobs["game_offsets"])
    if go_len % 4 or go_len < 8:
        raise BadEntry(f"game_offsets: {go_len} bytes, expected 4 * (G + 1) with G >= 1")
    g = go_len // 4 - 1
    if g > n:
        raise BadEntry(f"{g} games for {n} positions")
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, row, kind) in ARRAY_SPECS.items():
        count = n if kind == "P" else g if kind == "G" else g + 1
        dt = np.dtype(dtype)
        expect = count * dt.itemsize * (int(np.prod(row)) if row else 1)
        if len(blobs[name]) != expect:
            raise BadEntry(f"{name}: {len(blobs[name])} bytes, expected {expect} for {count} x {row or ()} {dtype}")
        arr = np.frombuffer(blobs[name], dtype=dt).astype(_NATIVE[name])
        arrays[name] = arr.reshape((count, *row)) if row else arr

    batch = ExperienceBatch(batch_id=batch_id, worker_id=worker, **arrays)
    _check_values(batch, v, max_plies)
    if check_legal:
        replay_check(batch, max_plies)
    else:
        ok = validate_hcp(batch.hcp)
        if not ok.all():
            raise BadEntry(f"hcp: malformed position at index {int(np.flatnonzero(~ok)[0])}")
    return batch


def _decompress(d: bytes, n: int) -> bytes:
    if len(d) < 5:
        raise BadEntry(f"d: {len(d)} bytes, too short for lz4")
    if len(d) > MAX_COMPRESSED_BYTES:
        raise BadEntry(f"d: {len(d)} bytes > {MAX_COMPRESSED_BYTES}")
    claimed = int.from_bytes(d[:4], "little")
    limit = (_BYTES_PER_POSITION + 7) * n + _MAX_MAP_OVERHEAD
    if claimed > limit or claimed == 0:
        raise BadEntry(f"lz4: claimed size {claimed} outside (0, {limit}] for n={n}")
    try:
        raw = lz4.block.decompress(d[4:], uncompressed_size=claimed)
    except Exception as exc:  # noqa: BLE001 - LZ4BlockError and friends
        raise BadEntry(f"lz4: {str(exc)[:80]}") from None
    if len(raw) != claimed:
        raise BadEntry(f"lz4: {len(raw)} bytes, header claims {claimed}")
    return raw


def _check_values(b: ExperienceBatch, v: int, max_plies: int) -> None:
    """Vectorised structural and value checks (no cshogi)."""
    p = b.num_positions
    off = b.game_offsets.astype(np.int64)
    if off[0] != 0 or off[-1] != p:
        raise BadEntry(f"game_offsets: start {off[0]} end {off[-1]}, expected 0 and {p}")
    if (np.diff(off) <= 0).any():
        raise BadEntry("game_offsets: not strictly increasing (empty or reversed game)")
    if int(b.action.max()) >= NUM_ACTIONS:
        raise BadEntry(f"action: {int(b.action.max())} >= {NUM_ACTIONS}")
    lp = b.log_prob
    if not np.isfinite(lp).all():
        raise BadEntry("log_prob: not finite")
    if float(lp.max()) > LOG_PROB_TOLERANCE:
        raise BadEntry(f"log_prob: {float(lp.max()):.3g} > 0")
    val = b.value
    if not np.isfinite(val).all():
        raise BadEntry("value: not finite")
    if float(np.abs(val).max()) > 1.0 + VALUE_TOLERANCE:
        raise BadEntry(f"value: {float(np.abs(val).max()):.3g} outside [-1, 1]")
    if int(b.version.max()) != v:
        raise BadEntry(f"version: newest {int(b.version.max())} != field v {v}")
    if int(b.repetition.max()) > 2:
        raise BadEntry(f"repetition: {int(b.repetition.max())} > 2")
    ply = b.ply.astype(np.int64)
    if int(ply.max()) >= max_plies:
        raise BadEntry(f"ply: {int(ply.max())} >= max_plies {max_plies}")
    gi = b.game_index()
    expected = ply[off[:-1]][gi] + (np.arange(p, dtype=np.int64) - off[:-1][gi])
    if not np.array_equal(ply, expected):
        raise BadEntry(f"ply: not consecutive within a game (first at position {int(np.flatnonzero(ply != expected)[0])})")
    turn = (b.hcp[:, 0] & 1).astype(np.int64)
    same_game = gi[1:] == gi[:-1]
    if (turn[1:][same_game] == turn[:-1][same_game]).any():
        raise BadEntry("hcp: side to move does not alternate within a game")
    res = b.result.astype(np.int64)
    rsn = b.reason.astype(np.int64)
    if ((res < -1) | (res > 1)).any():
        raise BadEntry("result: outside {-1, 0, 1}")
    if not np.isin(rsn, _SELF_PLAY_REASONS).all():
        raise BadEntry(f"reason: code outside {list(_SELF_PLAY_REASONS)}")
    last = off[1:] - 1
    end_ply = ply[last] + 1  # plies played when the game ended
    mover = 1 - 2 * turn[last]  # +1 when Black made the last move
    if ((rsn == MAX_PLIES) & ((end_ply != max_plies) | (res != 0))).any():
        raise BadEntry("MAX_PLIES game not a draw ending exactly at max_plies")
    if ((rsn == REPETITION_DRAW) & (res != 0)).any():
        raise BadEntry("REPETITION_DRAW game with a winner")
    if ((rsn == CHECKMATE) & (res != mover)).any():
        raise BadEntry("CHECKMATE game not won by the last mover")
    if ((rsn == ENTERING_KING) & (res != -mover)).any():
        raise BadEntry("ENTERING_KING game not won by the side to move after the last move")
    if ((rsn == PERPETUAL_CHECK) & (res == 0)).any():
        raise BadEntry("PERPETUAL_CHECK game without a winner")


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


def _hcp_tables():
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


# --------------------------------------------------------------------------------------------
# replay


def replay_check(batch: ExperienceBatch, max_plies: int) -> None:
    """Replay every game with cshogi and check it against the recorded data.

    For each game: the first position must pass :func:`validate_hcp` and the side not to move
    must not be in check; then for every position the action must be among cshogi's legal moves
    of the replayed board, and the replayed board's HCP must equal the recorded one. Repetition
    counts are recomputed from Zobrist keys the way ``keisei_stream.shogi.VecEnv`` does (earlier
    occurrences in the game, capped at 2; a 4th occurrence ends the game): they must match
    exactly for games recorded from ply 0 and may only be larger otherwise (occurrences before the
    first recorded position are unknown). After the last move: CHECKMATE needs no legal reply and
    every other reason needs one; ENTERING_KING needs ``is_nyugyoku()``, and no earlier position nor
    a MAX_PLIES end may allow it (``VecEnv`` ends the game by declaration first); for games recorded from
    ply 0, REPETITION_DRAW / PERPETUAL_CHECK need a 4th occurrence (PERPETUAL_CHECK with the
    winner that ``is_draw()`` gives), and the other reasons must not have one.

    Cost: about 5-12 us per position (one legal-move generation each), plus ~0.2 ms per batch.

    Raises:
        BadEntry: on the first inconsistency.
    """
    import cshogi

    # (2, 13527): low 15 bits of the cshogi move code of each action, per side to move.
    from keisei_stream.shogi.actions import _ACTION_TO_KEY as keys_table
    hcp = np.ascontiguousarray(batch.hcp, dtype=np.uint8)
    p = batch.num_positions
    off = batch.game_offsets.astype(np.int64)
    starts = off[:-1]
    ok = validate_hcp(hcp[starts])
    if not ok.all():
        raise BadEntry(f"hcp: malformed first position of game {int(np.flatnonzero(~ok)[0])}")
    hv = hcp.view(cshogi.HuffmanCodedPos).reshape(p)
    turn = (hcp[:, 0] & 1).astype(np.int64)
    move_keys = keys_table[turn, batch.action.astype(np.int64)].tolist()
    replayed = np.empty(p, dtype=cshogi.HuffmanCodedPos)
    rep = [0] * p
    board = cshogi.Board()
    flipped = np.empty(1, dtype=cshogi.HuffmanCodedPos)
    reasons = batch.reason.tolist()
    results = batch.result.tolist()
    full_history = (batch.ply[starts] == 0).tolist()
    for g in range(batch.num_games):
        s, e = int(off[g]), int(off[g + 1])
        flipped.view(np.uint8)[:] = hcp[s]
        flipped.view(np.uint8)[0] ^= 1
        board.set_hcp(flipped)
        if board.is_check():
            raise BadEntry(f"game {g}: the side not to move is in check at the start")
        board.set_hcp(hv[s:s + 1])
        counts: dict[int, int] = {}
        for t in range(s, e):
            board.to_hcp(replayed[t:t + 1])
            key = board.zobrist_hash()
            c = counts.get(key, 0) + 1
            counts[key] = c
            if c >= 4:
                raise BadEntry(f"position {t}: 4th occurrence, the game should have ended")
            rep[t] = c - 1
            mv = board.move_from_move16(move_keys[t])
            if mv not in list(board.legal_moves):
                raise BadEntry(f"action {int(batch.action[t])} at position {t} is not legal")
            board.push(mv)
            if t < e - 1 and board.is_nyugyoku():
                raise BadEntry(f"position {t + 1}: an entering-king declaration was possible, "
                               "the game should have ended")
        has_reply = any(True for _ in board.legal_moves)
        reason = reasons[g]
        if reason == CHECKMATE:
            if has_reply:
                raise BadEntry(f"game {g}: CHECKMATE but the last move does not mate")
            continue
        if not has_reply:
            raise BadEntry(f"game {g}: no legal reply after the last move but reason {reason}")
        if reason == ENTERING_KING and not board.is_nyugyoku():
            raise BadEntry(f"game {g}: ENTERING_KING but no entering-king declaration is possible")
        if reason == MAX_PLIES and board.is_nyugyoku():  # VecEnv checks the declaration first
            raise BadEntry(f"game {g}: MAX_PLIES but an entering-king declaration was possible")
        if full_history[g]:
            fourfold = counts.get(board.zobrist_hash(), 0) + 1 >= 4
            if reason in (REPETITION_DRAW, PERPETUAL_CHECK):
                if not fourfold:
                    raise BadEntry(f"game {g}: repetition end without a 4th occurrence")
                d = board.is_draw()
                if reason == PERPETUAL_CHECK:
                    mover = 1 if turn[e - 1] == 0 else -1
                    # REPETITION_WIN: the side to move wins (the last mover gave perpetual check).
                    want = {cshogi.REPETITION_WIN: -mover, cshogi.REPETITION_LOSE: mover}.get(d)
                    if want is None or results[g] != want:
                        raise BadEntry(f"game {g}: PERPETUAL_CHECK inconsistent with the repetition")
                elif d in (cshogi.REPETITION_WIN, cshogi.REPETITION_LOSE):
                    raise BadEntry(f"game {g}: REPETITION_DRAW but the repetition was perpetual check")
            elif fourfold:
                raise BadEntry(f"game {g}: reason {reason} but the last move repeats a position 4 times")
    rows = replayed.view(np.uint8).reshape(p, 32)
    if not np.array_equal(rows, hcp):
        bad = np.flatnonzero((rows != hcp).any(axis=1))[0]
        raise BadEntry(f"position {int(bad)} is not the previous position after its action")
    computed = np.minimum(np.array(rep, dtype=np.int64), 2)
    recorded = batch.repetition.astype(np.int64)
    exact = np.repeat(np.array(full_history, dtype=bool), np.diff(off))
    if ((exact & (recorded != computed)) | (~exact & (recorded < computed))).any():
        raise BadEntry("repetition: counts inconsistent with the replayed game")


# --------------------------------------------------------------------------------------------
# training inputs


def build_training_inputs(batch: ExperienceBatch, max_plies: int) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild the network inputs of ``batch`` with ``keisei_stream.shogi.encode_positions``.

    Returns:
        ``obs (P, 46, 9, 9) float32`` and ``mask (P, 13527) bool``.

    Call it only on batches from :func:`decode_entry` (their positions are known to be safe).
    """
    from keisei_stream import shogi

    return shogi.encode_positions(batch.hcp, batch.ply, batch.repetition, max_plies)


def concat_batches(batches: list[ExperienceBatch]) -> ExperienceBatch:
    """Join batches into one (offsets shifted; ``batch_id`` / ``worker_id`` of the first joined by ``+``).

    Raises:
        ValueError: for an empty list.
    """
    if not batches:
        raise ValueError("no batches")
    if len(batches) == 1:
        return batches[0]
    arrays = {name: np.concatenate([getattr(b, name) for b in batches]) for name in ARRAY_SPECS if name != "game_offsets"}
    shifts = np.cumsum([0] + [b.num_positions for b in batches[:-1]])
    offs = [np.zeros(1, np.uint32)] + [(b.game_offsets[1:].astype(np.int64) + s).astype(np.uint32) for b, s in zip(batches, shifts)]
    return ExperienceBatch(
        batch_id="+".join(b.batch_id for b in batches)[:MAX_ID_CHARS],
        worker_id="+".join(sorted({b.worker_id for b in batches}))[:MAX_ID_CHARS],
        game_offsets=np.concatenate(offs),
        **arrays,
    )


def wire_bytes(fields: Mapping[Any, Any]) -> int:
    """Bytes an entry's field names and values occupy (what XADD sends, protocol overhead aside)."""
    return sum(len(_as_bytes(k)) + len(_as_bytes(v)) for k, v in fields.items())


__all__ = [
    "SCHEMA_VERSION", "NUM_ACTIONS", "MAX_POSITIONS", "ARRAY_SPECS", "BadEntry", "ExperienceBatch",
    "encode_batch", "decode_entry", "entry_positions", "validate_hcp", "replay_check",
    "build_training_inputs", "concat_batches", "wire_bytes",
]


def random_games_batch(num_positions: int, *, max_plies: int = 256, num_games: int = 32, seed: int = 0,
                       worker_id: str = "w0", batch_id: str = "w0:test:0", version: int = 1,
                       opening_plies: int = 0) -> ExperienceBatch:
    """A realistic batch of complete uniformly-random self-play games (for tests and benchmarks).

    Plays ``num_games`` games at once with ``keisei_stream.shogi.VecEnv`` and keeps finished games
    until they hold at least ``num_positions`` positions (so P >= num_positions, whole games).
    ``log_prob`` is ``-log(legal moves)`` (the uniform policy), ``value`` uniform in [-1, 1],
    ``version`` constant.
    """
    from keisei_stream.shogi import VecEnv

    rng = np.random.default_rng(seed)
    env = VecEnv(num_games, max_plies, seed=seed, opening_plies=opening_plies)
    per_game: list[list[tuple]] = [[] for _ in range(num_games)]
    games: list[tuple[list[tuple], int, int]] = []
    total = 0
    while total < num_positions:
        hcp, ply, rep, turn = env.positions()
        actions = np.empty(num_games, np.int64)
        logp = np.empty(num_games, np.float32)
        for i in range(num_games):
            legal = env.legal_actions(i)
            actions[i] = legal[rng.integers(len(legal))]
            logp[i] = -np.log(np.float32(len(legal)))
        value = rng.uniform(-1, 1, num_games).astype(np.float32)
        for i in range(num_games):
            per_game[i].append((hcp[i], ply[i], rep[i], actions[i], logp[i], value[i]))
        res = env.step(actions)
        for i in np.flatnonzero(res.done):
            mover_sign = 1 if turn[i] == 0 else -1
            games.append((per_game[i], int(res.reward[i]) * mover_sign, int(res.reason[i])))
            total += len(per_game[i])
            per_game[i] = []
    rows = [r for gm in games for r in gm[0]]
    lengths = [len(gm[0]) for gm in games]
    p = len(rows)
    return ExperienceBatch(
        batch_id=batch_id,
        worker_id=worker_id,
        hcp=np.stack([r[0] for r in rows]).astype(np.uint8),
        ply=np.array([r[1] for r in rows], np.uint16),
        repetition=np.array([r[2] for r in rows], np.uint8),
        action=np.array([r[3] for r in rows], np.uint16),
        log_prob=np.array([r[4] for r in rows], np.float32),
        value=np.array([r[5] for r in rows], np.float32),
        version=np.full(p, version, np.uint32),
        game_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32),
        result=np.array([gm[1] for gm in games], np.int8),
        reason=np.array([gm[2] for gm in games], np.uint8),
    )
