"""The experience batch: game segments of one worker as NumPy columns, and their concatenation.

The columns, their dtypes and meaning are :mod:`keisei_stream.experience.schema`'s; the wire's
encoder and validated decoder (:mod:`keisei_stream.wire.codec`) and the training algorithm
(:mod:`keisei_stream.rl`) both work on this type, so neither imports the other.
"""

from __future__ import annotations

import numpy as np

from keisei_stream.shogi import EndReason

from .schema import COLUMNS, SEGMENT_OFFSETS

#: Longest batch id / worker id (characters): the decoder refuses longer ones, and a
#: concatenation's joined ids are cut to it.
MAX_ID_CHARS = 200


class ExperienceBatch:
    """Game segments of one worker: P positions in S segments, one array per column.

    Args:
        batch_id: unique id (``Producer.send`` sets it to ``{worker}:{session}:{seq}``).
        worker_id: the producing worker.
        **columns: exactly one array per column of ``schema.COLUMNS``: the per-position columns
            ``(P, *row shape)`` (``hcp`` ``(P, 32) uint8``, ``ply`` ``(P,) uint16``, ...),
            ``segment_offsets`` ``(S+1,) uint32`` and the per-segment columns ``(S,)``
            (``result``, ``reason``, ``bootstrap``, ``bootstrap_advantage``, ``game``); their dtypes and meaning are the
            schema module's. Shapes and dtypes are checked by the wire's ``encode_batch`` and
            guaranteed by its ``decode_entry`` (:mod:`keisei_stream.wire.codec`), not here.

    Attributes:
        batch_id: as given.
        worker_id: as given.
        columns: one attribute per name in ``schema.COLUMNS`` (``hcp``, ``ply``, ``repetition``,
            ``action``, ``log_prob``, ``value``, ``version``, ``segment_offsets``, ``result``,
            ``reason``, ``bootstrap``, ``bootstrap_advantage``, ``game``).

    Raises:
        TypeError: a column is missing or unknown.
    """

    def __init__(self, batch_id: str, worker_id: str, **columns: np.ndarray):
        if columns.keys() != COLUMNS.keys():
            missing = sorted(COLUMNS.keys() - columns.keys())
            unknown = sorted(columns.keys() - COLUMNS.keys())
            raise TypeError(f"ExperienceBatch columns: missing {missing}, unknown {unknown}")
        self.batch_id = batch_id
        self.worker_id = worker_id
        for name in COLUMNS:
            setattr(self, name, columns[name])

    def __repr__(self) -> str:
        return (f"ExperienceBatch(batch_id={self.batch_id!r}, worker_id={self.worker_id!r}, "
                f"positions={self.num_positions}, segments={self.num_segments}, games_ended={self.games_ended})")

    def columns(self) -> dict[str, np.ndarray]:
        """``{name: array}`` of every column, in wire order (the arrays themselves, not copies)."""
        return {name: getattr(self, name) for name in COLUMNS}

    @property
    def num_positions(self) -> int:
        """P."""
        return int(self.action.shape[0])

    @property
    def num_segments(self) -> int:
        """S."""
        return int(self.segment_offsets.shape[0]) - 1

    @property
    def ended(self) -> np.ndarray:
        """``(S,) bool``: the game ended in the segment (else the segment was cut)."""
        return self.reason != EndReason.NONE

    @property
    def games_ended(self) -> int:
        """Segments in which their game ended."""
        return int(self.ended.sum())

    @property
    def newest_version(self) -> int:
        """Largest ``version`` (the entry's ``v`` field); 0 for an empty batch."""
        return int(self.version.max()) if self.version.size else 0

    def turns(self) -> np.ndarray:
        """``(P,) uint8`` side to move of each position (0 Black, 1 White): bit 0 of the HCP."""
        return (self.hcp[:, 0] & 1).astype(np.uint8)

    def final_rewards(self) -> np.ndarray:
        """``(S,) float32`` reward of each segment's last mover: +1 won, -1 lost, 0 draw or cut.

        ``result`` is from Black's view; the last mover is the side to move of each segment's last
        position, so the reward is ``result`` for Black and ``-result`` for White.
        """
        last = self.segment_offsets[1:].astype(np.int64) - 1
        sign = 1.0 - 2.0 * (self.hcp[last, 0] & 1).astype(np.float32)
        return (self.result.astype(np.float32) * sign).astype(np.float32)

    def segment_index(self) -> np.ndarray:
        """``(P,) int64`` segment of each position."""
        return np.repeat(np.arange(self.num_segments, dtype=np.int64), np.diff(self.segment_offsets.astype(np.int64)))


def concat_batches(batches: list[ExperienceBatch]) -> ExperienceBatch:
    """Join batches into one (offsets shifted; ``batch_id`` / ``worker_id`` joined by ``+``).

    An empty list gives a batch of 0 positions and 0 segments (a learner rank that holds nothing
    still takes part in a distributed update).
    """
    if not batches:
        return ExperienceBatch("", "", **{name: np.zeros((col.rows(0, 0), *col.shape), col.native)
                                          for name, col in COLUMNS.items()})
    if len(batches) == 1:
        return batches[0]
    arrays = {name: np.concatenate([getattr(b, name) for b in batches]) for name in COLUMNS if name != SEGMENT_OFFSETS}
    shifts = np.cumsum([0] + [b.num_positions for b in batches[:-1]])
    offs = [np.zeros(1, np.uint32)] + [(b.segment_offsets[1:].astype(np.int64) + s).astype(np.uint32)
                                       for b, s in zip(batches, shifts)]
    return ExperienceBatch(
        batch_id="+".join(b.batch_id for b in batches)[:MAX_ID_CHARS],
        worker_id="+".join(sorted({b.worker_id for b in batches}))[:MAX_ID_CHARS],
        **arrays,
        **{SEGMENT_OFFSETS: np.concatenate(offs)},
    )


__all__ = ["MAX_ID_CHARS", "ExperienceBatch", "concat_batches"]
