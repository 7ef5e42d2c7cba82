"""The column schema of an experience batch, defined once.

A batch holds P positions in S segments as columns: NumPy arrays with one row per position, one
row per segment, or one row per segment plus one (the offsets). A **segment** is a run of
consecutive positions of one game; a cut segment (its game goes on) carries the bootstrap of the
position after its last move (the manual's RL page, "Segments and the look-ahead", explains the
mechanism). This module is the only place that lists the columns; the batch class
(:mod:`keisei_stream.experience.batch`), the wire's encoder and decoder, the worker's trajectory
buffers and the learner's batch assembly all derive from it.

Per position, :data:`POSITION` (a packed structured dtype, 49 bytes)::

    hcp         (32,) u1  cshogi HuffmanCodedPos of the position before the move
    ply         <u2       plies played before the position (0 = game start); consecutive within a
                          game and below the run's ``env.max_plies``
    repetition  u1        earlier occurrences of the position in the game, capped at 2
                          (observation plane 44 is ``repetition / 3``)
    action      <u2       action index played, in the mover's frame (``keisei_stream.shogi``,
                          < 13,527)
    log_prob    <f4       behaviour log-probability of ``action``, in nats (finite, <= 0)
    value       <f4       behaviour value estimate from the side to move's view, in [-1, 1]
    version     <u4       model version that chose the action

Per segment, :data:`SEGMENT`::

    result      i1        the game's result if it ended in the segment: +1 Black won, -1 White
                          won, 0 draw; 0 for a cut segment
    reason      u1        ``keisei_stream.shogi.EndReason`` code of the end (1..5 in self-play),
                          0 (``NONE``) for a cut segment
    bootstrap   <f4       a cut segment's value of the position after its last move, from the side
                          to move there, in [-1, 1]; 0 when the game ended in the segment
    bootstrap_advantage
                <f4       a cut segment's GAE advantage of that position (same view), computed by
                          the worker over the look-ahead plies with the run's gamma and lambda, in
                          [-2, 2]; 0 without look-ahead and when the game ended
    game        <u8       the game: the same number for every segment of one game (a worker's
                          random 32-bit session prefix and its game counter), so that the learner
                          can join consecutive segments it holds together

and ``segment_offsets`` ``(S+1,) <u4``: segment ``s`` is positions ``off[s]:off[s+1]``;
``off[0] = 0``, ``off[S] = P``, strictly increasing (:data:`SEGMENT_OFFSETS`). A segment's
start ply is its first position's ``ply``.

On the wire every column is its raw little-endian bytes, in the order of :data:`COLUMNS`
(positions, offsets, segments): 49 bytes per position and 22 per segment before compression.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Schema version of the wire format (stream field ``s`` and msgpack key ``schema``); 3: segments
#: with a bootstrap advantage (2: segments with a bootstrap value only; 1: whole games only).
SCHEMA_VERSION = 3

#: One position's columns (packed: ``POSITION.itemsize`` is the bytes per position on the wire).
POSITION = np.dtype([
    ("hcp", "u1", (32,)),
    ("ply", "<u2"),
    ("repetition", "u1"),
    ("action", "<u2"),
    ("log_prob", "<f4"),
    ("value", "<f4"),
    ("version", "<u4"),
])
#: One segment's columns.
SEGMENT = np.dtype([
    ("result", "i1"),
    ("reason", "u1"),
    ("bootstrap", "<f4"),
    ("bootstrap_advantage", "<f4"),
    ("game", "<u8"),
])
#: Name and element dtype of the ``(S+1,)`` column of segment boundaries.
SEGMENT_OFFSETS = "segment_offsets"
SEGMENT_OFFSETS_DTYPE = np.dtype("<u4")

#: Uncompressed wire bytes of one position (49).
BYTES_PER_POSITION = POSITION.itemsize
#: Uncompressed wire bytes of one segment: its columns plus one offset (22).
BYTES_PER_SEGMENT = SEGMENT.itemsize + SEGMENT_OFFSETS_DTYPE.itemsize


class Column(NamedTuple):
    """How one column is laid out.

    Attributes:
        dtype: wire dtype of one element (little-endian, e.g. ``<u2``).
        shape: shape of one row: ``(32,)`` for ``hcp``, ``()`` for every other column.
        per: ``"P"`` one row per position, ``"S"`` one per segment, ``"S1"`` S+1 rows (the offsets).
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    per: str

    @property
    def native(self) -> np.dtype:
        """The element dtype in this machine's byte order (what decoded arrays hold)."""
        return self.dtype.newbyteorder("=")

    def rows(self, positions: int, segments: int) -> int:
        """Rows of this column in a batch of ``positions`` positions and ``segments`` segments."""
        return positions if self.per == "P" else segments if self.per == "S" else segments + 1

    def nbytes(self, positions: int, segments: int) -> int:
        """Wire bytes of this column in a batch of ``positions`` positions and ``segments`` segments."""
        return self.rows(positions, segments) * self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))


def _columns(record: np.dtype, per: str) -> dict[str, Column]:
    out = {}
    for name in record.names:
        field = record.fields[name][0]
        out[name] = Column(field.base.newbyteorder("<"), field.shape, per)
    return out


#: Every column of a batch in wire order: name -> :class:`Column`.
COLUMNS: dict[str, Column] = {
    **_columns(POSITION, "P"),
    SEGMENT_OFFSETS: Column(SEGMENT_OFFSETS_DTYPE, (), "S1"),
    **_columns(SEGMENT, "S"),
}


def zeros(record: np.dtype, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One zero array per field of ``record`` (:data:`POSITION` or :data:`SEGMENT`).

    Returns:
        ``{name: array}`` in field order, each native-endian and shaped ``(*shape, *row shape)``,
        e.g. ``zeros(POSITION, (N, T))["hcp"]`` is ``(N, T, 32) uint8``.
    """
    return {name: np.zeros((*shape, *col.shape), col.native) for name, col in _columns(record, "").items()}


__all__ = [
    "SCHEMA_VERSION", "POSITION", "SEGMENT", "SEGMENT_OFFSETS", "SEGMENT_OFFSETS_DTYPE", "BYTES_PER_POSITION",
    "BYTES_PER_SEGMENT", "Column", "COLUMNS", "zeros",
]
