"""Self-play: N games stepped together with one batched forward pass per step, their positions
recorded in trajectory buffers, finished games turned into experience batches.

The worker process (``workers/worker.py``) is a shell around :func:`selfplay_step` and
:func:`games_to_batch`; the benchmarks run the same functions. Never imports redis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from keisei_stream.rl.policy import act
from keisei_stream.shogi import GameRecord, StepResult, VecEnv
from keisei_stream.wire import schema
from keisei_stream.wire.codec import ExperienceBatch, concat_batches


@dataclass
class Trajectories:
    """Per-game trajectory buffers of the games in play.

    Attributes:
        length: ``(N,) int64`` positions stored per game.
        columns: one array per column of ``schema.POSITION`` (``hcp``, ``ply``, ``repetition``,
            ``action``, ``log_prob``, ``value``, ``version``), native-endian, shaped
            ``(N, max_plies, *row shape)``: position ``t`` of game ``i`` is at ``[i, t]``.
    """

    length: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def empty(cls, n: int, max_plies: int) -> "Trajectories":
        return cls(np.zeros(n, np.int64), schema.zeros(schema.POSITION, (n, max_plies)))

    def take(self, i: int) -> dict[str, np.ndarray]:
        """Copy out game ``i``'s positions (one ``(length, *row shape)`` array per column) and clear it."""
        k = int(self.length[i])
        self.length[i] = 0
        return {name: col[i, :k].copy() for name, col in self.columns.items()}


@dataclass
class FinishedGame:
    """A game that ended in a self-play step: its record (for the games stream) and its positions
    (one array per column of ``schema.POSITION``, :meth:`Trajectories.take`'s)."""

    record: GameRecord
    positions: dict[str, np.ndarray]

    @property
    def num_positions(self) -> int:
        return int(self.positions["ply"].shape[0])


def selfplay_step(env: VecEnv, model: torch.nn.Module, traj: Trajectories, version: int,
                  temperature: float, rng: torch.Generator | None = None) -> tuple[StepResult, list[FinishedGame]]:
    """One step of N games: one batched forward pass, N moves sampled, N positions recorded.

    Args:
        env: the N games. model: the actor-critic (on the CPU). traj: their trajectory buffers.
        version: the model version that chooses the moves (recorded per position).
        temperature: sampling temperature (0 = argmax). rng: the sampling noise's generator.

    Returns:
        ``(StepResult, finished)``: the env's step result and the games that ended in this step.
    """
    obs, mask = env.observe(copy=False)  # act() copies them into tensors before env.step
    hcp, ply, repetition, _turn = env.positions()
    actions, log_prob, value = act(model, obs, mask, temperature, generator=rng)
    recorded = {"hcp": hcp, "ply": ply, "repetition": repetition, "action": actions, "log_prob": log_prob,
                "value": value, "version": version}
    rows, t = np.arange(env.num_games), traj.length
    for name, col in traj.columns.items():
        col[rows, t] = recorded[name]
    traj.length += 1
    res = env.step(actions)
    done_idx = np.flatnonzero(res.done)
    return res, [FinishedGame(record, traj.take(int(i))) for i, record in zip(done_idx, res.finished)]


def games_to_batch(games: list[FinishedGame]) -> ExperienceBatch:
    """One experience batch of finished games (in order; ``batch_id`` and ``worker_id`` are set by
    the producer that sends it).

    Raises:
        ValueError: no games.
    """
    if not games:
        raise ValueError("no games to batch")
    return concat_batches([
        ExperienceBatch("", "", **g.positions, game_offsets=np.array([0, g.num_positions], np.uint32),
                        result=np.array([g.record.result], np.int8), reason=np.array([int(g.record.reason)], np.uint8))
        for g in games])
