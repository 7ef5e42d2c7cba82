"""VecEnv behaviour pinned by hashes: seeded games must stay move-for-move identical.

Each case plays a seeded :class:`VecEnv` for a number of steps with a fixed action choice and
hashes everything that comes out (observations, masks, compact positions, rewards, reasons, dones,
finished records). The expected digests were computed on the code *before* the end rules moved to
:mod:`keisei_stream.shogi.referee` (commit 2b4a03b); a change here means self-play changed.
The cases between them reach every self-play end reason (checkmate, repetition draw, perpetual
check, entering king, max plies) and random openings that had to be retried.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import cshogi
import numpy as np
import pytest

from keisei_stream.shogi import VecEnv, usi_to_action

SFENS = (
    "+R7+B/4K4/+P+P+P+P1+P+P+P+P/9/p8/9/9/9/8k w 4G4S2N 1",  # Black can declare after any move
    "8k/9/9/9/9/9/9/9/K6R1 b - 1",
    "8k/9/9/9/9/9/9/9/K7R w - 1",
    "k8/9/9/9/9/9/9/9/1r6K w - 1",
    "k8/9/9/9/9/9/9/9/r7K b - 1",
    "4k4/9/4P4/9/9/9/9/9/4K4 b G 1",
    "+R7+B/9/+P+P+P+P1+P+P+P+P/4K4/p8/9/9/9/8k b 4G4S2N 1",
)


def play_and_hash(num_games: int, max_plies: int, seed: int, opening_plies: int, steps: int, policy: str,
                  sfens: tuple[str, ...] = ()) -> tuple[str, dict[str, int]]:
    """Play ``steps`` steps; returns the SHA-256 of all outputs and the count of each end reason.

    Policies: ``random`` (uniform, seeded), ``first`` / ``last`` (lowest / highest legal action
    index: shuffling pieces, many repetitions), ``check`` (a checking move when there is one with
    probability 0.9, else the lowest legal action with probability 0.7, else uniform).
    """
    env = VecEnv(num_games, max_plies, seed=seed, opening_plies=opening_plies)
    for i, s in enumerate(sfens):
        env.reset_game(i, s)
    rng = np.random.default_rng(seed + 1000)
    h = hashlib.sha256()
    reasons: Counter = Counter()
    for _ in range(steps):
        obs, mask = env.observe(copy=False)
        h.update(obs.tobytes())
        h.update(np.packbits(mask).tobytes())
        for a in env.positions():
            h.update(a.tobytes())
        acts = []
        for i in range(num_games):
            legal = np.flatnonzero(mask[i])
            if policy == "first":
                acts.append(legal[0])
                continue
            if policy == "last":
                acts.append(legal[-1])
                continue
            if policy == "check":
                b = env.boards[i]
                checks = []
                for m in b.legal_moves:
                    b.push(m)
                    if b.is_check():
                        checks.append(m)
                    b.pop()
                if checks and rng.random() < 0.9:
                    acts.append(usi_to_action(cshogi.move_to_usi(checks[0]), b.turn))
                    continue
                if rng.random() < 0.7:
                    acts.append(legal[0])
                    continue
            acts.append(legal[rng.integers(len(legal))])
        res = env.step(np.array(acts, dtype=np.int64))
        h.update(res.reward.tobytes())
        h.update(res.reason.tobytes())
        h.update(res.done.tobytes())
        for rec in res.finished:
            d = rec.to_dict()
            h.update(json.dumps(d, sort_keys=True).encode())
            reasons[d["reason"]] += 1
    return h.hexdigest(), dict(reasons)


CASES = [
    ((16, 40, 7, 4, 200, "random"), {"MAX_PLIES": 80},
     "d7ca1859afe182a2b3e3182975ccdedb8039907e3341718048853ea0bd6e885e"),
    ((8, 120, 3, 0, 200, "first"), {"REPETITION_DRAW": 64},
     "5c0288d5bf68a48e2ff00aac8240ceb1dc59b785712c052c5e3335702f80dc59"),
    ((8, 120, 5, 2, 200, "last"), {"REPETITION_DRAW": 23},
     "a14f22c3b96b2bef8c477761b410c3bcbffe1aa7255bba82824a33b16ed82104"),
    ((8, 200, 11, 6, 200, "random"), {"CHECKMATE": 2, "MAX_PLIES": 6},
     "02a6d733f587404dc57c20b41b71c76e54e34f543997a97e860bbf1c36922c50"),
    ((8, 120, 5, 0, 200, "check", SFENS),
     {"ENTERING_KING": 1, "CHECKMATE": 2, "PERPETUAL_CHECK": 2, "REPETITION_DRAW": 4, "MAX_PLIES": 5},
     "d5ac42f73398398eb085822c6b4aba2215f10d044414c1380a549206cd0f129b"),
    ((32, 400, 0, 300, 20, "random"), {"CHECKMATE": 2},
     "d3ca6d5e20ec53d96fdf3c61faff0fcb689856030c69a2150922615b9b254726"),  # 300-ply openings: some are retried
]


@pytest.mark.parametrize("args,reasons,digest", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_seeded_games_are_unchanged(args, reasons, digest):
    got, got_reasons = play_and_hash(*args)
    assert got_reasons == reasons
    assert got == digest
