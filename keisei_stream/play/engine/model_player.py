"""The network a player plays with: loading it from a checkpoint (:func:`load_player_model`, on the
device :func:`resolve_device` picks) and its raw policy as a player (:class:`ModelPlayer`, one
forward pass per move; the USI engine's ``Nodes 0`` and its fallback).

Errors come out as :class:`keisei_stream.play.players.SpecError`, since the model is named by a
player spec string or the engine's ``--checkpoint``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import cshogi
import numpy as np
import torch
from torch import nn

from keisei_stream.config import Config, ConfigError
from keisei_stream.play.engine.leaves import training_ply
from keisei_stream.play.players import STARTPOS, SpecError
from keisei_stream.rl import checkpoint
from keisei_stream.rl.model import pick_device
from keisei_stream.shogi import (
    RepetitionTracker, encode_observation, legal_move_from_usi, legal_moves_and_actions, repetition_feature,
)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``).

    Raises:
        SpecError: unknown name, or CUDA requested but not available.
    """
    try:
        return pick_device(name)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def load_player_model(source: Union[str, Path, tuple], device: str = "cpu") -> tuple[nn.Module, Config, dict, str]:
    """The model a player plays with: ``source`` is a checkpoint path or ``(model, config[, meta])``.

    Returns:
        ``(model, config, meta, default_name)``: the model in eval mode on ``device`` (a given model
        is used as it is), its run config, the checkpoint's info (version, updates, extra) or the
        given meta, and a name for the player (the checkpoint's file stem, or ``"model"``).

    Raises:
        SpecError: unreadable checkpoint, a config it cannot be built from, or a bad device.
    """
    if isinstance(source, tuple):
        return source[0], source[1], dict(source[2]) if len(source) > 2 else {}, "model"
    dev = resolve_device(device)
    try:
        model, info = checkpoint.load_model_from_checkpoint(source, map_location="cpu")
    except (checkpoint.CheckpointError, ConfigError) as exc:
        raise SpecError(str(exc)) from None
    config = info.pop("config")
    info.pop("config_json")
    return model.to(dev), config, info, Path(source).stem


class ModelPlayer:
    """The policy network as a player: one forward pass per move.

    Args:
        source: a checkpoint path (read by ``keisei_stream.rl.checkpoint.load_model_from_checkpoint``),
            or a ``(model, config)`` or ``(model, config, meta)`` tuple already loaded.
        temperature: 0 = argmax of the legal logits; > 0 samples ``softmax(logits / T)`` over the
            legal moves.
        device: torch device name for a checkpoint (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``);
            a loaded model stays where it is.
        name: shown in results (default: the file name, or ``"model"``).
        seed: seed of the sampling generator (temperature > 0).
        threads: torch intra-op threads to set for this process (default 1; None = leave as is).

    The observation is ``keisei_stream.shogi.encode_observation(board, ply, repetition,
    cfg.env.max_plies)`` ``(46, 9, 9) float32``, with ``ply`` clamped as in training
    (:func:`keisei_stream.play.engine.leaves.training_ply`), ``repetition`` = earlier occurrences
    of the position in this game (counted from the positions seen since :meth:`new_game`, opening
    included) and the model's own training ``max_plies``; the legal moves and their action
    indices come from ``keisei_stream.shogi.legal_moves_and_actions``.

    Attributes:
        model, config, meta: the network, its :class:`keisei_stream.config.Config`, and the
            checkpoint's ``version``/``updates``/``extra`` (or the tuple's ``meta``).

    Raises:
        SpecError: unreadable checkpoint or its config, unavailable device, temperature < 0 or
            not finite.
    """

    def __init__(self, source: Union[str, Path, tuple], temperature: float = 0.0, device: str = "cpu",
                 name: Optional[str] = None, seed: int = 0, threads: Optional[int] = 1):
        if threads:
            # one position per forward pass: intra-op threads cost more than they give on tensors
            # this small, and their spin-waits stall badly on a busy machine (measured here: 1 ms
            # per move with 1 thread, 150-250 ms with 2 on a loaded 2-core box). Matches get
            # their parallelism from processes instead. Note: process-wide setting.
            torch.set_num_threads(threads)

        self.model: Optional[nn.Module]
        self.config: Config
        self.model, self.config, self.meta, default_name = load_player_model(source, device)
        if temperature < 0 or not math.isfinite(temperature):
            raise SpecError(f"temperature must be >= 0, got {temperature}")
        self.name = name or default_name
        self.temperature = float(temperature)
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.model.eval()
        self.max_plies = int(self.config.env.max_plies)
        self.generator = torch.Generator().manual_seed(seed)
        self._tracker = RepetitionTracker()

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        """Forget the last game's positions, count those of the opening ``moves`` (for the
        repetition plane), and reseed the sampling generator with ``seed`` (if given).

        Raises:
            ValueError: an opening move that is not legal.
        """
        self._tracker = RepetitionTracker()
        if seed is not None:
            self.generator.manual_seed(seed)
        # count the positions before each opening move; the position after the opening is
        # counted by choose() when it is this player's turn there
        b = cshogi.Board() if start_sfen == STARTPOS else cshogi.Board(start_sfen)
        for mv in moves:
            self._tracker.push(b)
            b.push(legal_move_from_usi(b, mv))

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]:
        """The policy's move (cshogi move code), or ``"resign"`` without a legal move."""
        # a position repeats with the same side to move, i.e. at this player's turns only, so
        # counting here (plus the opening in new_game) sees every earlier occurrence.
        repetition = repetition_feature(self._tracker.push(board))
        move, _ = self.policy_move(board, ply, repetition)
        return move

    def policy_move(self, board: cshogi.Board, ply: int, repetition: int = 0) -> tuple[Union[str, int], float]:
        """One forward pass: ``(move, value)``.

        Args:
            board: position (side to move = the player); not modified.
            ply: moves played since the game's start; repetition: earlier occurrences (0..2).

        Returns:
            ``move``: cshogi move code (``"resign"`` when there is no legal move); ``value``:
            the value head in [-1, 1] for the side to move (0.0 without legal moves).
        """
        moves, actions = legal_moves_and_actions(board)
        if len(moves) == 0:
            return "resign", 0.0
        obs = encode_observation(board, int(training_ply(ply, self.max_plies)), min(max(int(repetition), 0), 2),
                                 self.max_plies)
        with torch.inference_mode():
            x = torch.from_numpy(obs)[None].to(self.device)
            logits, value = self.model(x)
            legal_logits = logits[0].float().cpu()[torch.from_numpy(np.asarray(actions, dtype=np.int64))]
            if self.temperature == 0.0:
                i = int(torch.argmax(legal_logits))
            else:
                probs = torch.softmax(legal_logits / self.temperature, dim=0)
                i = int(torch.multinomial(probs, 1, generator=self.generator))
            v = float(value.reshape(-1)[0])
        return int(moves[i]), v

    def close(self) -> None:
        """Drop the model (its memory is freed with the last reference)."""
        self.model = None
