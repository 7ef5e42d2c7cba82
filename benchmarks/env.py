"""Self-play environment throughput (one process, one core).

Prints one JSON object:
  * ``vecenv_positions_per_s``: random self-play through :class:`VecEnv` with N games, each step
    including the observation ``(N, 46, 9, 9) float32`` and mask ``(N, 13527) bool`` copies
    (``observe()``) and uniform sampling among the legal actions with NumPy;
  * ``baseline_cshogi_positions_per_s``: bare cshogi random play measured in the same run (push a
    uniformly random legal move, reset finished games; no observations, no masks, no end rules
    beyond "no legal move" and max plies);
  * ``encode_positions_per_s``: :func:`encode_positions` on HCPs collected from the self-play run
    (decoding, observations and masks), fresh output arrays per call; and
    ``encode_positions_reused_buffers_per_s`` with ``out=`` buffers reused;
  * ``ratio_vecenv_to_baseline``.

Usage: python benchmarks/env.py [--games 64] [--seconds 5] [--max-plies 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cshogi
import numpy as np

from keisei_stream.shogi import VecEnv, encode_positions


def sample_uniform(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random legal action per row of ``mask (N, A) bool`` -> ``(N,) int64``."""
    n, a = mask.shape
    flat = np.flatnonzero(mask)                       # sorted by row
    counts = np.bincount(flat // a, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = starts + (rng.random(n) * counts).astype(np.int64)
    return flat[pick] - np.arange(n) * a


def bench_vecenv(games: int, max_plies: int, seconds: float, seed: int):
    env = VecEnv(games, max_plies, seed=seed, opening_plies=0)
    rng = np.random.default_rng(seed)
    hcps, plies, reps = [], [], []
    positions = finished = steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        obs, mask = env.observe()
        steps += 1
        if steps % 4 == 0 and len(hcps) < 64:  # 4096 positions spread over the first games
            h, p, r, _ = env.positions()
            hcps.append(h), plies.append(p), reps.append(r)
        res = env.step(sample_uniform(mask, rng))
        positions += games
        finished += len(res.finished)
    dt = time.perf_counter() - t0
    return positions / dt, finished, (np.concatenate(hcps), np.concatenate(plies), np.concatenate(reps))


def bench_cshogi(games: int, max_plies: int, seconds: float, seed: int):
    rng = np.random.default_rng(seed)
    boards = [cshogi.Board() for _ in range(games)]
    plies = [0] * games
    positions = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i, board in enumerate(boards):
            legal = list(board.legal_moves)
            board.push(legal[int(rng.integers(len(legal)))])
            plies[i] += 1
            if plies[i] >= max_plies or len(board.legal_moves) == 0:
                board.reset()
                plies[i] = 0
        positions += games
    return positions / (time.perf_counter() - t0)


def bench_encode(data, max_plies: int, seconds: float, reuse: bool) -> float:
    hcp, ply, rep = data
    out = (np.empty((len(hcp), 46, 9, 9), np.float32), np.empty((len(hcp), 13527), bool)) if reuse else None
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        encode_positions(hcp, ply, rep, max_plies, out=out)
        n += len(hcp)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--max-plies", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    vec, finished, data = bench_vecenv(args.games, args.max_plies, args.seconds, args.seed)
    base = bench_cshogi(args.games, args.max_plies, args.seconds, args.seed)
    enc = bench_encode(data, args.max_plies, args.seconds, reuse=False)
    enc_reuse = bench_encode(data, args.max_plies, args.seconds, reuse=True)
    print(json.dumps({
        "benchmark": "env",
        "games": args.games,
        "max_plies": args.max_plies,
        "vecenv_positions_per_s": round(vec),
        "vecenv_games_finished": finished,
        "baseline_cshogi_positions_per_s": round(base),
        "ratio_vecenv_to_baseline": round(vec / base, 3),
        "encode_positions_per_s": round(enc),
        "encode_positions_reused_buffers_per_s": round(enc_reuse),
        "encode_batch_positions": int(len(data[0])),
        "goal_vecenv_positions_per_s": 20000,
        "goal_encode_positions_per_s": 50000,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
