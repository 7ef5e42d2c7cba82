"""Batched leaf evaluation: the observations of the leaves a search waits on, one forward pass over
them, and the priors over each leaf's legal moves.

Observations
    Leaves are encoded exactly like :func:`keisei_stream.shogi.encode_observation` (core46,
    ``(46, 9, 9) float32``, mover's frame) with ``ply`` = plies since the game's start clamped as
    the network saw it in training (:func:`training_ply`), ``repetition`` = earlier occurrences of
    the position (game history + path), capped at 2, and ``max_plies`` = the model's training
    ``env.max_plies`` (plane 43 = ply / max_plies). cshogi writes the piece planes of each leaf
    into a preallocated batch buffer; the rest of the planes are written for the whole batch at
    once.

Priors
    ``softmax(legal logits / policy_temperature)`` per leaf, computed on the host over the legal
    entries only (segment max / sum with ``np.maximum.reduceat`` / ``np.add.reduceat``); the moves
    of each leaf come back sorted by decreasing prior (one ``np.lexsort`` over the batch), the
    order :class:`keisei_stream.play.engine.tree.Node` keeps its edges in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cshogi
import numpy as np
import torch

from keisei_stream.shogi import NUM_ACTIONS, NUM_PLANES, moves_to_actions

# The vectorised tail of the observation encoder (hands, side to move, ply, repetition and
# constant planes, plus the piece-plane permutation), shared with VecEnv. Private to the shogi
# layer: tests/test_search.py checks the result equals encode_observation, so a change there fails
# loudly here.
from keisei_stream.shogi.observation import _finish_planes


def training_ply(ply, max_plies: int):
    """The ply the network is shown for a position ``ply`` plies after the game's start:
    ``min(ply, max_plies - 1)`` with ``max_plies`` the model's training ``env.max_plies``.

    A training game ends as a draw once ``max_plies`` moves are played (the referee's move limit,
    :func:`keisei_stream.shogi.judge`), so the observations it learned from have plane 43 =
    ``ply / max_plies`` in ``[0, (max_plies - 1) / max_plies]``; a real game (a GUI's limit, or
    none) goes on, and its later positions are shown as the last ply training reached.

    Args:
        ply: an ``int`` (-> NumPy integer) or an integer array (-> the same shape), >= 0.
        max_plies: >= 1.
    """
    return np.minimum(ply, max_plies - 1)


class LeafBatch:
    """Observations of up to ``capacity`` leaves, written one by one, finished once per batch.

    ``tensor``: ``(capacity, 46, 9, 9) float32`` (pinned host memory when ``pin``), ``obs`` its
    NumPy view. :meth:`add` writes cshogi's 28 piece planes of the board's current position (the
    search board is only there for a moment) and records hands, side to move, ply, repetition and
    the legal moves; :meth:`finish` writes the remaining planes for all rows at once (the same
    function as :func:`keisei_stream.shogi.encode_observation`, with :func:`training_ply`) and
    maps the legal moves to action indices with one table lookup.
    """

    def __init__(self, capacity: int, max_plies: int, pin: bool = False) -> None:
        self.capacity = capacity
        self.max_plies = max_plies
        self.tensor = torch.zeros((capacity, NUM_PLANES, 9, 9), dtype=torch.float32, pin_memory=pin)
        self.obs = self.tensor.numpy()
        self._rows = [self.obs[i] for i in range(capacity)]
        self.size = 0
        # per row: hands (14 counts, mover's first), side to move, ply, repetition, legal moves
        self._columns: tuple[list, ...] = ([], [], [], [], [])
        self.moves: list[int] = []

    def clear(self) -> None:
        """Empty the batch (the piece planes of the rows used are zeroed)."""
        if self.size:
            self.obs[: self.size, :28] = 0.0
        self.size = 0
        for column in self._columns:
            column.clear()
        self.moves.clear()

    def add(self, board: cshogi.Board, ply: int, repetition: int, legal: list[int]) -> int:
        """Record ``board``'s position (``legal``: its legal moves); returns its row."""
        i = self.size
        board.piece_planes_rotate(self._rows[i])
        black, white = board.pieces_in_hand
        t = board.turn
        hands, turns, plies, reps, counts = self._columns
        hands.append(black + white if t == 0 else white + black)
        turns.append(t)
        plies.append(ply)
        reps.append(repetition)
        self.moves.extend(legal)
        counts.append(len(legal))
        self.size = i + 1
        return i

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(obs (k, 46, 9, 9) float32 view, moves (M,) int64, actions (M,) int64,
        counts (k,) int64)``: the legal moves of the k rows back to back (cshogi codes and action
        indices) and the number of moves per row."""
        k = self.size
        hands, turns, plies, reps, counts = (np.array(c, dtype=np.int64) for c in self._columns)
        _finish_planes(self.obs[:k], hands, turns, training_ply(plies, self.max_plies), reps, self.max_plies)
        moves = np.array(self.moves, dtype=np.int64)
        actions = moves_to_actions(moves, np.repeat(turns, counts))
        return self.obs[:k], moves, actions, counts


@dataclass
class Evaluated:
    """The network's answer for the k rows of a :class:`LeafBatch`.

    Attributes:
        moves: ``list[int]`` the rows' legal moves back to back, each row's sorted by decreasing
            prior; row ``i`` is ``moves[bounds[i]:bounds[i + 1]]``.
        priors: ``list[float]`` the matching priors (each row's sums to 1).
        bounds: ``list[int]`` (k + 1) row offsets into ``moves`` / ``priors``.
        values: ``list[float]`` (k) the value head for each row's side to move, in [-1, 1].
        seconds: wall time of the forward pass (model call + gathering to the host).
    """

    moves: list[int]
    priors: list[float]
    bounds: list[int]
    values: list[float]
    seconds: float


def evaluate_leaves(model: torch.nn.Module, batch: LeafBatch, device: torch.device, *, amp: bool = False,
                    policy_temperature: float = 1.0) -> Evaluated:
    """One forward pass of ``model`` over the rows of ``batch`` (module docstring for the priors).

    Args:
        model: ``forward(obs (B, 46, 9, 9) float32) -> (logits (B, 13527), value (B,))``, on
            ``device``.
        batch: at least one row.
        device: where the inputs go (from pinned host memory on CUDA).
        amp: bf16 autocast (CUDA only).
        policy_temperature: priors = ``softmax(legal logits / policy_temperature)`` (> 0).

    Returns:
        :class:`Evaluated`.
    """
    _, moves, actions, counts = batch.finish()
    k = len(counts)
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = np.repeat(np.arange(k, dtype=np.int64), counts)
    t = time.perf_counter()
    with torch.inference_mode():
        x = batch.tensor[:k].to(device, non_blocking=True)
        if amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, value = model(x)
        else:
            logits, value = model(x)
        idx = torch.from_numpy(rows * NUM_ACTIONS + actions).to(device, non_blocking=True)
        legal_logits = logits.reshape(-1).index_select(0, idx).float().cpu().numpy()
        values = value.float().reshape(-1).cpu().numpy()
    seconds = time.perf_counter() - t
    z = legal_logits.astype(np.float64)
    if policy_temperature != 1.0:
        z /= policy_temperature
    starts = offsets[:-1]
    z -= np.repeat(np.maximum.reduceat(z, starts), counts)
    e = np.exp(z)
    e /= np.repeat(np.add.reduceat(e, starts), counts)
    order = np.lexsort((-e, rows))  # by leaf, then decreasing prior (stable: generation order)
    return Evaluated(moves[order].tolist(), e[order].tolist(), offsets.tolist(), values.tolist(), seconds)
