"""Wire codec of experience batches: one batch of game segments = one Redis stream entry.

Stream entry fields (the manual's wire format page, docs/wire-format.md)::

    d  bytes  lz4 block (4-byte little-endian uncompressed size + data) of a msgpack map
    w  str    worker id
    v  int    newest model version used in the batch
    n  int    positions in the batch (P)
    s  int    schema version (``schema.SCHEMA_VERSION``)

The msgpack map (string keys, exactly these): ``batch_id`` (str, unique per worker, producer
session and sequence number), ``schema`` (int), and one key per column of
``keisei_stream.experience.schema.COLUMNS`` holding the column's raw little-endian bytes, in that order
(the schema module documents every column's dtype, shape, meaning and units).

That is 49 bytes per position before compression plus 22 per segment; lz4 brings batches of
random-play segments with random float32 values/log-probs to ~25 bytes per position on the wire
(``benchmarks/codec.py``; consecutive HCPs share most bytes), under the 30-byte target.
``value`` stays float32: float16 would save 2 bytes per position (~4%) at a relative error of
5e-4, not worth a second dtype in the learner.

:func:`decode_entry` validates everything before any of it reaches training and raises
:class:`~keisei_stream.wire.errors.BadEntry` (one exception type, with a short ``reason``) for any
problem; it never raises anything else on hostile bytes and never hands cshogi a position that
could crash it (see :mod:`keisei_stream.wire.replay`). No pickle anywhere; this module does not
import torch.
"""

from __future__ import annotations

from typing import Any, Mapping

import lz4.block
import msgpack
import numpy as np

from keisei_stream.experience import (BYTES_PER_POSITION, BYTES_PER_SEGMENT, COLUMNS, MAX_ID_CHARS, SCHEMA_VERSION,
                                     SEGMENT_OFFSETS, ExperienceBatch)
from keisei_stream.shogi import BOARD_END_REASONS, MOVER_SCORES, NUM_ACTIONS, EndReason

from .errors import BadEntry
from .replay import GameBook, replay_check, validate_hcp

#: Most positions one entry may carry.
MAX_POSITIONS = 1 << 20
#: Most bytes of field ``d``.
MAX_COMPRESSED_BYTES = 64 << 20
#: ``log_prob`` may exceed 0 by this much (float32 rounding of log-softmax of a forced move).
LOG_PROB_TOLERANCE = 1e-4
#: Smallest behaviour log-probability accepted. A sampled move has probability below e^-40
#: (4e-18) with a chance under 600 * 4e-18 per position (at most ~600 legal moves), so no real
#: worker sends one in any run; a poisoned value would otherwise blow up the importance weight.
MIN_LOG_PROB = -40.0
#: ``|value|`` may exceed 1 by this much (float32 rounding).
VALUE_TOLERANCE = 1e-6
#: ``|bootstrap + bootstrap_advantage|`` may exceed 1 by this much (float32 rounding of the
#: worker's GAE over up to 65,535 look-ahead plies).
RETURN_TOLERANCE = 1e-4

_MAP_KEYS = frozenset(("batch_id", "schema", *COLUMNS))
_FIELD_KEYS = frozenset((b"d", b"w", b"v", b"n", b"s"))
# Bound on the decompressed map, checked before allocating: every position with one segment of
# its own (a segment has at least one position) plus a byte of slack each (72 bytes per
# position), and the map's keys, ids and bin headers.
_MAX_RAW_BYTES_PER_POSITION = BYTES_PER_POSITION + BYTES_PER_SEGMENT + 1
_MAX_MAP_OVERHEAD = 1024 + 2 * MAX_ID_CHARS * 4


# --------------------------------------------------------------------------------------------
# encode


def encode_batch(batch: ExperienceBatch) -> dict[str, bytes | str | int]:
    """Encode ``batch`` into the stream fields ``{d, w, v, n, s}`` (``d`` bytes, ``w`` str, the rest int).

    Raises:
        ValueError: when a column has the wrong number of rows or row shape (a bug in the caller).
    """
    p = batch.num_positions
    g = batch.num_segments
    payload: dict[str, Any] = {"batch_id": str(batch.batch_id), "schema": SCHEMA_VERSION}
    for name, col in COLUMNS.items():
        arr = np.ascontiguousarray(getattr(batch, name), dtype=col.dtype)
        expected = (col.rows(p, g), *col.shape)
        if arr.shape != expected:
            raise ValueError(f"{name}: shape {arr.shape}, expected {expected}")
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


def decode_entry(fields: Mapping[Any, Any], *, max_plies: int, check_legal: bool = True,
                 max_version: int | None = None, worker: str | None = None,
                 games: GameBook | None = None) -> ExperienceBatch:
    """Decode and validate one stream entry.

    Args:
        fields: the entry's field map as redis-py returns it (``dict[bytes, bytes]``; ``str`` keys
            and values are accepted too).
        max_plies: the run's ``env.max_plies`` (plies must be below it; MAX_PLIES games end on it).
        check_legal: also replay every segment with cshogi from its first position
            (:func:`~keisei_stream.wire.replay.replay_check`): each action legal in its position,
            each position the previous one after its action, and the referee's verdict after the
            last move the recorded end (none for a cut segment); about 3 us per position. Without
            it the positions are still checked to be well-formed HCPs that cshogi can load safely.
        max_version: the newest model version published so far; an entry claiming a newer one
            (field ``v``) is rejected (None: not checked).
        worker: the worker whose stream the entry came from (the stream, not the entry, says who
            wrote it): field ``w`` must name it and ``batch_id`` start with ``{worker}:``
            (None: not checked).
        games: with ``check_legal``, the games in flight the entry's segments continue
            (:class:`~keisei_stream.wire.replay.GameBook`, keyed by ``worker``): plies and
            positions must continue each game's previous segment, repetition counts and endings
            are judged over the game's history; the book's changes are staged, for its owner to
            ``commit()`` once it keeps the batch (None: each segment on its own).

    Returns:
        The :class:`ExperienceBatch` (owned, writable, native-endian arrays).

    Raises:
        BadEntry: for anything wrong: missing or extra fields, non-integer ``v``/``n``/``s``,
            wrong schema, lz4 errors, a claimed decompressed size above ``72 * n + 2624`` bytes
            (refused before allocating), msgpack errors, missing/extra/mistyped map keys, array byte
            lengths inconsistent with ``n`` and the segment offsets, non-monotone offsets,
            actions >= 13527, non-finite log-probabilities or outside [``MIN_LOG_PROB``, 0],
            values or bootstraps outside [-1, 1] (bootstrap advantages [-2, 2], their sum, the
            worker's lambda-return, [-1, 1]), a version newer than ``max_version``, a ``w`` or
            ``batch_id`` of another worker than ``worker``,
            versions inconsistent with ``v``, non-consecutive plies, a side to move that is not
            the ply's (Black moves at even plies: games start from the initial position), plies
            >= ``max_plies``,
            results inconsistent with the end reason, a cut segment with a result or reaching
            ``max_plies``, an ended one with a bootstrap, malformed positions, and
            (``check_legal``) illegal actions, inconsistent positions, endings the position or
            the game's history do not allow, and segments that do not continue their game.
    """
    if games is not None:
        games.discard()  # whatever an earlier entry staged and its owner did not commit
    try:
        return _decode(fields, max_plies, check_legal, max_version, worker, games)
    except BadEntry:
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: hostile input never crashes
        raise BadEntry(f"undecodable entry: {type(exc).__name__}: {str(exc)[:120]}") from None


def _decode(fields: Mapping[Any, Any], max_plies: int, check_legal: bool, max_version: int | None,
            worker: str | None, games: GameBook | None) -> ExperienceBatch:
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
    if max_version is not None and v > max_version:
        raise BadEntry(f"field v: version {v} is newer than the newest published ({max_version})")
    try:
        claimed = f[b"w"].decode("utf-8")
    except UnicodeDecodeError:
        raise BadEntry("field w: not UTF-8") from None
    if not claimed or len(claimed) > MAX_ID_CHARS:
        raise BadEntry("field w: empty or too long")
    if worker is not None and claimed != worker:
        raise BadEntry(f"field w: {claimed[:40]!r} on the stream of worker {worker!r}")

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
    if worker is not None and not batch_id.startswith(worker + ":"):
        raise BadEntry(f"batch_id: {batch_id[:40]!r} is not one of worker {worker!r} ({worker}:...)")
    if type(payload["schema"]) is not int or payload["schema"] != SCHEMA_VERSION:
        raise BadEntry(f"map schema {str(payload['schema'])[:20]}, expected {SCHEMA_VERSION}")

    blobs = {}
    for name in COLUMNS:
        b = payload[name]
        if not isinstance(b, bytes):
            raise BadEntry(f"{name}: {type(b).__name__}, expected bytes")
        blobs[name] = b
    offset_size = COLUMNS[SEGMENT_OFFSETS].dtype.itemsize
    go_len = len(blobs[SEGMENT_OFFSETS])
    if go_len % offset_size or go_len < 2 * offset_size:
        raise BadEntry(f"segment_offsets: {go_len} bytes, expected {offset_size} * (S + 1) with S >= 1")
    g = go_len // offset_size - 1
    if g > n:
        raise BadEntry(f"{g} segments for {n} positions")
    arrays: dict[str, np.ndarray] = {}
    for name, col in COLUMNS.items():
        count = col.rows(n, g)
        expect = col.nbytes(n, g)
        if len(blobs[name]) != expect:
            raise BadEntry(f"{name}: {len(blobs[name])} bytes, expected {expect} for {count} x {col.shape} {col.dtype.str}")
        arr = np.frombuffer(blobs[name], dtype=col.dtype).astype(col.native)
        arrays[name] = arr.reshape((count, *col.shape)) if col.shape else arr

    batch = ExperienceBatch(batch_id=batch_id, worker_id=claimed, **arrays)
    try:
        _check_values(batch, v, max_plies)
        if check_legal:
            replay_check(batch, max_plies, games, claimed)
        else:
            ok = validate_hcp(batch.hcp)
            if not ok.all():
                raise BadEntry(f"hcp: malformed position at index {int(np.flatnonzero(~ok)[0])}")
    except BadEntry as exc:
        exc.positions = n  # decoded, then found bad: these positions are what the entry held
        raise
    return batch


def _decompress(d: bytes, n: int) -> bytes:
    if len(d) < 5:
        raise BadEntry(f"d: {len(d)} bytes, too short for lz4")
    if len(d) > MAX_COMPRESSED_BYTES:
        raise BadEntry(f"d: {len(d)} bytes > {MAX_COMPRESSED_BYTES}")
    claimed = int.from_bytes(d[:4], "little")
    limit = _MAX_RAW_BYTES_PER_POSITION * n + _MAX_MAP_OVERHEAD
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
    _check_offsets(b)
    _check_position_values(b, v, max_plies)
    _check_segment_ends(b, max_plies)


def _check_offsets(b: ExperienceBatch) -> None:
    off = b.segment_offsets.astype(np.int64)
    if off[0] != 0 or off[-1] != b.num_positions:
        raise BadEntry(f"segment_offsets: start {off[0]} end {off[-1]}, expected 0 and {b.num_positions}")
    if (np.diff(off) <= 0).any():
        raise BadEntry("segment_offsets: not strictly increasing (empty or reversed segment)")


def _check_position_values(b: ExperienceBatch, v: int, max_plies: int) -> None:
    """Actions, log-probabilities, values, versions, repetitions in range; plies consecutive and
    sides to move alternating within every segment."""
    if int(b.action.max()) >= NUM_ACTIONS:
        raise BadEntry(f"action: {int(b.action.max())} >= {NUM_ACTIONS}")
    lp = b.log_prob
    if not np.isfinite(lp).all():
        raise BadEntry("log_prob: not finite")
    if float(lp.max()) > LOG_PROB_TOLERANCE:
        raise BadEntry(f"log_prob: {float(lp.max()):.3g} > 0")
    if float(lp.min()) < MIN_LOG_PROB:
        raise BadEntry(f"log_prob: {float(lp.min()):.3g} < {MIN_LOG_PROB} (no policy samples such a move)")
    for name, bound in (("value", 1.0), ("bootstrap", 1.0), ("bootstrap_advantage", 2.0)):
        val = getattr(b, name)
        if not np.isfinite(val).all():
            raise BadEntry(f"{name}: not finite")
        if float(np.abs(val).max()) > bound + VALUE_TOLERANCE:
            raise BadEntry(f"{name}: {float(np.abs(val).max()):.3g} outside [-{bound:g}, {bound:g}]")
    # bootstrap + its advantage is the worker's lambda-return of the position after the cut: a
    # lambda-weighted mean of discounted values in [-1, 1] with no reward before the game's end
    # (the look-ahead never crosses it), so honest data always have |B + A_B| <= 1
    lam_return = np.abs(b.bootstrap.astype(np.float64) + b.bootstrap_advantage.astype(np.float64))
    if float(lam_return.max()) > 1.0 + RETURN_TOLERANCE:
        raise BadEntry(f"bootstrap + bootstrap_advantage: {float(lam_return.max()):.3g} outside [-1, 1]")
    if int(b.version.max()) != v:
        raise BadEntry(f"version: newest {int(b.version.max())} != field v {v}")
    if int(b.repetition.max()) > 2:
        raise BadEntry(f"repetition: {int(b.repetition.max())} > 2")
    ply = b.ply.astype(np.int64)
    if int(ply.max()) >= max_plies:
        raise BadEntry(f"ply: {int(ply.max())} >= max_plies {max_plies}")
    off, si = b.segment_offsets.astype(np.int64), b.segment_index()
    expected = ply[off[:-1]][si] + (np.arange(b.num_positions, dtype=np.int64) - off[:-1][si])
    if not np.array_equal(ply, expected):
        raise BadEntry(f"ply: not consecutive within a segment (first at position {int(np.flatnonzero(ply != expected)[0])})")
    turn = (b.hcp[:, 0] & 1).astype(np.int64)
    if (turn != (ply & 1)).any():  # with consecutive plies: the sides alternate within a segment
        bad = int(np.flatnonzero(turn != (ply & 1))[0])
        raise BadEntry(f"hcp: {'White' if turn[bad] else 'Black'} to move at ply {int(ply[bad])} (position {bad}): "
                       "games start from the initial position, Black moves at even plies")


def _check_segment_ends(b: ExperienceBatch, max_plies: int) -> None:
    """Every segment either ended its game with a board reason and a result that reason allows
    the last mover (the referee's table, ``MOVER_SCORES``) and no bootstrap, or was cut (reason
    0) with result 0, before ``max_plies``."""
    res, rsn = b.result.astype(np.int64), b.reason.astype(np.int64)
    if ((res < -1) | (res > 1)).any():
        raise BadEntry("result: outside {-1, 0, 1}")
    allowed = [int(EndReason.NONE), *(int(r) for r in BOARD_END_REASONS)]
    if not np.isin(rsn, allowed).all():
        raise BadEntry(f"reason: code outside {allowed}")
    last = b.segment_offsets[1:].astype(np.int64) - 1
    end_ply = b.ply.astype(np.int64)[last] + 1  # plies played after the segment's last move
    mover_score = res * (1 - 2 * (b.hcp[last, 0] & 1).astype(np.int64))  # +1 when the last mover won
    cut = rsn == EndReason.NONE
    if (cut & (res != 0)).any():
        raise BadEntry("a cut segment with a result")
    if (~cut & ((b.bootstrap != 0) | (b.bootstrap_advantage != 0))).any():
        raise BadEntry("a segment that ended its game with a bootstrap value")
    if (cut & (end_ply >= max_plies)).any() or ((rsn == EndReason.MAX_PLIES) & (end_ply != max_plies)).any():
        raise BadEntry("a segment reaching max_plies not ended as MAX_PLIES exactly there")
    for reason, scores in MOVER_SCORES.items():
        if ((rsn == reason) & ~np.isin(mover_score, scores)).any():
            raise BadEntry(f"{reason.name} segment with a result its rule does not give the last mover")


def max_entry_bytes(positions: int) -> int:
    """Most bytes an honest entry of at most ``positions`` positions sends (the ``d`` field at the
    decoder's own bound, :data:`_MAX_RAW_BYTES_PER_POSITION` per position plus the map's overhead,
    after lz4's worst-case expansion ``n + n / 255 + 16``, plus the plain fields): what a server's
    request-size limits must let through (:mod:`keisei_stream.ops.local`).

    Raises:
        ValueError: ``positions < 1``.
    """
    if positions < 1:
        raise ValueError("positions must be >= 1")
    raw = _MAX_RAW_BYTES_PER_POSITION * positions + _MAX_MAP_OVERHEAD
    return 4 + raw + raw // 255 + 16 + 2 * MAX_ID_CHARS * 4 + 256


def wire_bytes(fields: Mapping[Any, Any]) -> int:
    """Bytes an entry's field names and values occupy (what XADD sends, protocol overhead aside)."""
    return sum(len(_as_bytes(k)) + len(_as_bytes(v)) for k, v in fields.items())


__all__ = [
    "MAX_POSITIONS", "MAX_COMPRESSED_BYTES", "LOG_PROB_TOLERANCE", "MIN_LOG_PROB", "VALUE_TOLERANCE",
    "RETURN_TOLERANCE", "encode_batch", "decode_entry", "entry_positions", "max_entry_bytes", "wire_bytes",
]
