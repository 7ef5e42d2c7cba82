"""Realistic experience batches for the codec, transport and scale benchmarks.

``benchmark_batches`` plays uniformly random self-play with the library's own
:func:`keisei_stream.rl.selfplay.random_policy_batch` (games cut into segments as workers cut
them) and makes the float columns realistic and incompressible. Imported by the benchmark scripts
as ``from batches import benchmark_batches`` (a script's folder is on ``sys.path``).
"""

from __future__ import annotations

import numpy as np

from keisei_stream.rl.selfplay import random_policy_batch
from keisei_stream.experience import ExperienceBatch


def benchmark_batches(count: int, positions: int, *, max_plies: int, num_games: int,
                      segment_plies: int = 32, lookahead_plies: int = 32) -> list[ExperienceBatch]:
    """``count`` batches of :func:`random_policy_batch` (seeds 0..count-1, at least ``positions``
    positions each) with realistic, incompressible float columns: values uniform in [-1, 1] and
    log-probabilities below the uniform policy's by an exponential(0.5) amount; games cut as
    workers cut them by default (32-ply segments sent 32 plies later, with their bootstrap values
    and advantages)."""
    rng = np.random.default_rng(0)
    batches = []
    for i in range(count):
        b = random_policy_batch(positions, max_plies=max_plies, games=num_games, seed=i, segment_plies=segment_plies,
                                lookahead_plies=lookahead_plies)
        b.value = rng.uniform(-1, 1, b.num_positions).astype(np.float32)
        b.log_prob = (b.log_prob - rng.exponential(0.5, b.num_positions)).astype(np.float32)
        b.batch_id = f"bench:{i:08x}:{i}"
        batches.append(b)
    return batches
