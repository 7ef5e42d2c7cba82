"""The column schema of an experience batch, defined once.

A batch holds P positions in G complete games (every position of each game, in order) as
columns: NumPy arrays with one row per position, one row per game, or one row per game plus one
(the offsets). This module is the only place that lists them; the batch class, the encoder and
decoder, the worker's trajectory buffers and the learner's batch assembly all derive from it.

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

Per game, :data:`GAME`::

    result      i1        +1 Black won, -1 White won, 0 draw
    reason      u1        ``keisei_stream.shogi.EndReason`` code (1..5 in self-play)

and ``game_offsets`` ``(G+1,) <u4``: game ``g`` is positions ``off[g]:off[g+1]``; ``off[0] = 0``,
``off[G] = P``, strictly increasing (:data:`GAME_OFFSETS`).

On the wire every column is its raw little-endian bytes, in the order of :data:`COLUMNS`
(positions, offsets, games): 49 bytes per position and 6 per game before compression.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Schema version of the wire format (stream field ``s`` and msgpack key ``schema``).
SCHEMA_VERSION = 1

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
#: One game's columns.
GAME = np.dtype([
    ("result", "i1"),
    ("reason", "u1"),
])
#: Name and element dtype of the ``(G+1,)`` column of game boundaries.
GAME_OFFSETS = "game_offsets"
GAME_OFFSETS_DTYPE = np.dtype("<u4")

#: Uncompressed wire bytes of one position (49).
BYTES_PER_POSITION = POSITION.itemsize
#: Uncompressed wire bytes of one game: its columns plus one offset (6).
BYTES_PER_GAME = GAME.itemsize + GAME_OFFSETS_DTYPE.itemsize


class Column(NamedTuple):
    """How one column is laid out.

    Attributes:
        dtype: wire dtype of one element (little-endian, e.g. ``<u2``).
        shape: shape of one row: ``(32,)`` for ``hcp``, ``()`` for every other column.
        per: ``"P"`` one row per position, ``"G"`` one per game, ``"G1"`` G+1 rows (the offsets).
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    per: str

    @property
    def native(self) -> np.dtype:
        """The element dtype in this machine's byte order (what decoded arrays hold)."""
        return self.dtype.newbyteorder("=")

    def rows(self, positions: int, games: int) -> int:
        """Rows of this column in a batch of ``positions`` positions and ``games`` games."""
        return positions if self.per == "P" else games if self.per == "G" else games + 1

    def nbytes(self, positions: int, games: int) -> int:
        """Wire bytes of this column in a batch of ``positions`` positions and ``games`` games."""
        return self.rows(positions, games) * self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))


def _columns(record: np.dtype, per: str) -> dict[str, Column]:
    out = {}
    for name in record.names:
        field = record.fields[name][0]
        out[name] = Column(field.base.newbyteorder("<"), field.shape, per)
    return out


#: Every column of a batch in wire order: name -> :class:`Column`.
COLUMNS: dict[str, Column] = {
    **_columns(POSITION, "P"),
    GAME_OFFSETS: Column(GAME_OFFSETS_DTYPE, (), "G1"),
    **_columns(GAME, "G"),
}


def zeros(record: np.dtype, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One zero array per field of ``record`` (:data:`POSITION` or :data:`GAME`).

    Returns:
        ``{name: array}`` in field order, each native-endian and shaped ``(*shape, *row shape)``,
        e.g. ``zeros(POSITION, (N, T))["hcp"]`` is ``(N, T, 32) uint8``.
    """
    return {name: np.zeros((*shape, *col.shape), col.native) for name, col in _columns(record, "").items()}


class BadEntry(ValueError):
    """A stream entry that must not reach training; ``reason`` says why (at most 300 characters).

    ``positions`` is the number of positions actually decoded from the entry before it was found
    bad (0 when its arrays could not be decoded): what the accounting counts, never the entry's
    own claim.
    """

    def __init__(self, reason: str, positions: int = 0):
        reason = str(reason)
        if len(reason) > 300:
            reason = reason[:297] + "..."
        super().__init__(reason)
        self.reason = reason
        self.positions = int(positions)


__all__ = [
    "SCHEMA_VERSION", "POSITION", "GAME", "GAME_OFFSETS", "GAME_OFFSETS_DTYPE", "BYTES_PER_POSITION",
    "BYTES_PER_GAME", "Column", "COLUMNS", "zeros", "BadEntry",
]
