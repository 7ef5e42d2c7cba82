"""The experience contract: what a worker's self-play produces and the learner trains on.

- :mod:`.schema`: the columns of a batch (positions, segments, offsets), defined once.
- :mod:`.batch`: :class:`ExperienceBatch` (one array per column) and :func:`concat_batches`.

Below both :mod:`keisei_stream.rl` (which fills and trains on batches) and
:mod:`keisei_stream.wire` (which encodes, validates and moves them): imports neither, nor torch
or redis.
"""

from .batch import MAX_ID_CHARS, ExperienceBatch, concat_batches
from .schema import (BYTES_PER_POSITION, BYTES_PER_SEGMENT, COLUMNS, POSITION, SCHEMA_VERSION, SEGMENT,
                     SEGMENT_OFFSETS, SEGMENT_OFFSETS_DTYPE, Column, zeros)

__all__ = [
    "MAX_ID_CHARS", "ExperienceBatch", "concat_batches", "BYTES_PER_POSITION", "BYTES_PER_SEGMENT", "COLUMNS",
    "POSITION", "SCHEMA_VERSION", "SEGMENT", "SEGMENT_OFFSETS", "SEGMENT_OFFSETS_DTYPE", "Column", "zeros",
]
