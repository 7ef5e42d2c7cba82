"""Realistic experience batches for tests and benchmarks (complete uniformly random games).

Importable as ``tests.games`` with the repository root on ``sys.path`` (the test suite's
conftest and the benchmarks put it there).
"""

from __future__ import annotations

import numpy as np

from keisei_stream.shogi import VecEnv
from keisei_stream.wire.codec import ExperienceBatch


def random_games_batch(num_positions: int, *, max_plies: int = 256, num_games: int = 32, seed: int = 0,
                       worker_id: str = "w0", batch_id: str = "w0:test:0", version: int = 1,
                       opening_plies: int = 0) -> ExperienceBatch:
    """A realistic batch of complete uniformly-random self-play games.

    Plays ``num_games`` games at once with ``keisei_stream.shogi.VecEnv`` and keeps finished games
    until they hold at least ``num_positions`` positions (so P >= num_positions, whole games).
    ``log_prob`` is ``-log(legal moves)`` (the uniform policy), ``value`` uniform in [-1, 1],
    ``version`` constant. Deterministic for given arguments.
    """
    rng = np.random.default_rng(seed)
    env = VecEnv(num_games, max_plies, seed=seed, opening_plies=opening_plies)
    per_game: list[list[tuple]] = [[] for _ in range(num_games)]
    games: list[tuple[list[tuple], int, int]] = []
    total = 0
    while total < num_positions:
        hcp, ply, repetition, turn = env.positions()
        actions = np.empty(num_games, np.int64)
        log_prob = np.empty(num_games, np.float32)
        for i in range(num_games):
            legal = env.legal_actions(i)
            actions[i] = legal[rng.integers(len(legal))]
            log_prob[i] = -np.log(np.float32(len(legal)))
        value = rng.uniform(-1, 1, num_games).astype(np.float32)
        for i in range(num_games):
            per_game[i].append((hcp[i], ply[i], repetition[i], actions[i], log_prob[i], value[i]))
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


def benchmark_batches(count: int, positions: int, *, max_plies: int, num_games: int) -> list[ExperienceBatch]:
    """``count`` batches of :func:`random_games_batch` (seeds 0..count-1) with realistic,
    incompressible float columns: values uniform in [-1, 1] and log-probabilities below the
    uniform policy's by an exponential(0.5) amount (what the codec and transport benchmarks send)."""
    rng = np.random.default_rng(0)
    batches = []
    for i in range(count):
        b = random_games_batch(positions, max_plies=max_plies, num_games=num_games, seed=i)
        b.value = rng.uniform(-1, 1, b.num_positions).astype(np.float32)
        b.log_prob = (b.log_prob - rng.exponential(0.5, b.num_positions)).astype(np.float32)
        b.batch_id = f"bench:{i:08x}:{i}"
        batches.append(b)
    return batches
