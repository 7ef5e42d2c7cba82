"""The player protocol and its errors: what matches (:mod:`keisei_stream.play.evaluation.match`)
need of a player, and what every player (the engine's and the evaluation's) implements.

Every player follows the :class:`Player` protocol:

- ``name``: str shown in results;
- ``new_game(start_sfen="startpos", moves=(), seed=None)``: a game starts from ``start_sfen``
  (``"startpos"`` or a full SFEN) after ``moves`` (USI strings: the random opening, if any) were
  already played; ``seed`` makes the player's own randomness reproducible per game;
- ``choose(board, ply) -> str | int``: the move for the side to move of ``board`` (a
  ``cshogi.Board`` whose ``history`` holds every move since ``start_sfen``), as a cshogi move
  code or a USI string (``"resign"`` and ``"win"``, the entering-king declaration, are allowed);
  ``ply`` = moves played so far (opening included). The match judges legality (with the
  referee, :mod:`keisei_stream.shogi.referee`), not the player;
- ``game_over(result)``: optional notification, ``result`` in ``"win" | "lose" | "draw"``;
- ``close()``: release processes and memory.

A player that cannot answer raises :class:`PlayerError` with ``reason`` ``"timeout"`` (no
answer in time; the engine process is killed), ``"crash"`` (the engine process died or closed its
output) or ``"illegal"`` (unparseable answer); the match
(:func:`keisei_stream.play.evaluation.match.play_game`) scores that game as a loss with the
reason and the match goes on (a USI engine is restarted at the next ``new_game``).

The players: :class:`keisei_stream.play.engine.model_player.ModelPlayer` (the policy network),
:class:`keisei_stream.play.engine.search_player.SearchPlayer` (the tree search),
:class:`keisei_stream.play.evaluation.usi_client.UsiEnginePlayer` (an external USI engine) and the
random and greedy movers of :mod:`keisei_stream.play.evaluation.baselines`; all of them are built
from spec strings by :func:`keisei_stream.play.evaluation.specs.make_player`.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import cshogi

#: ``start_sfen`` of a game from the standard starting position.
STARTPOS = "startpos"


class PlayerError(Exception):
    """A player failed to produce a move; ``reason`` is ``"timeout"``, ``"crash"`` or ``"illegal"``,
    ``message`` says what happened."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


class SpecError(ValueError):
    """A player spec string is malformed or names something that cannot be loaded."""


class Player(Protocol):
    """What a match needs of a player (module docstring)."""

    name: str

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None: ...

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]: ...

    def close(self) -> None: ...
