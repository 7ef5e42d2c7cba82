"""Small helpers shared by several test files (plain functions and classes, no fixtures)."""

from __future__ import annotations

import cshogi
import numpy as np


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
