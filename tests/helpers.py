"""Small helpers shared by several test files (plain functions and classes, no fixtures)."""

from __future__ import annotations

import cshogi
import numpy as np

from keisei_stream.experience import ExperienceBatch
from keisei_stream.shogi import VecEnv, usi_to_action


def random_positions(n_positions: int, seed: int, max_game_plies: int = 300) -> list[cshogi.Board]:
    """Boards (copies) from uniformly random games, until ``n_positions`` are collected."""
    rng = np.random.default_rng(seed)
    out, board, plies = [], cshogi.Board(), 0
    while len(out) < n_positions:
        legal = list(board.legal_moves)
        if not legal or plies >= max_game_plies:
            board.reset()
            plies = 0
            continue
        out.append(board.copy())
        board.push(legal[int(rng.integers(len(legal)))])
        plies += 1
    return out


class Scripted:
    """An evaluation player that plays a fixed list of USI moves, cycling."""

    def __init__(self, moves, name: str = "scripted"):
        self.moves, self.name, self.i = moves, name, 0

    def new_game(self, *args, **kwargs):
        self.i = 0

    def choose(self, board, ply):
        m = self.moves[self.i % len(self.moves)]
        self.i += 1
        return m

    def close(self):
        pass


def scripted_game(moves, sfen=None, ply0=0, max_plies=64, game=1, worker="w0") -> ExperienceBatch:
    """One game played with the USI ``moves`` (from the start, or ``sfen``) as a batch of one
    segment, recorded from ply ``ply0`` (a game's ply 0 is the initial position): ended with the
    referee's verdict when the last move ends it, else cut after it (bootstrap 0).

    Raises:
        AssertionError: the game ended before its last move.
    """
    env = VecEnv(1, max_plies)
    if sfen is not None:
        env.reset_game(0, sfen)
    rows, res = [], None
    for u in moves:
        hcp, ply, rep, turn = env.positions()
        a = usi_to_action(u, int(turn[0]))
        rows.append((hcp[0], int(ply[0]) + ply0, rep[0], a, int(turn[0])))
        res = env.step(np.array([a]))
        assert not res.done[0] or len(rows) == len(moves), "the game ended before its last move"
    p, ended = len(rows), bool(res.done[0])
    mover = 1 if rows[-1][4] == 0 else -1
    return ExperienceBatch(
        batch_id=f"{worker}:s:0", worker_id=worker,
        hcp=np.stack([r[0] for r in rows]), ply=np.array([r[1] for r in rows], np.uint16),
        repetition=np.array([r[2] for r in rows], np.uint8), action=np.array([r[3] for r in rows], np.uint16),
        log_prob=np.full(p, -1.0, np.float32), value=np.zeros(p, np.float32), version=np.ones(p, np.uint32),
        segment_offsets=np.array([0, p], np.uint32),
        result=np.array([int(res.reward[0]) * mover if ended else 0], np.int8),
        reason=np.array([res.reason[0] if ended else 0], np.uint8), bootstrap=np.zeros(1, np.float32),
        bootstrap_advantage=np.zeros(1, np.float32), game=np.array([game], np.uint64))
