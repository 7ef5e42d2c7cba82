"""The tree search as a player of matches: :class:`SearchPlayer`."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import cshogi
import numpy as np
import torch

from keisei_stream.play.engine.mcts import MCTS
from keisei_stream.play.engine.model_player import load_player_model
from keisei_stream.play.engine.tree import SearchResult
from keisei_stream.play.players import STARTPOS


class SearchPlayer:
    """The tree search as a :class:`keisei_stream.play.players.Player` (``nodes`` simulations a move).

    Args:
        source: a checkpoint path, or a ``(model, config[, meta])`` tuple already loaded (as
            :class:`keisei_stream.play.engine.model_player.ModelPlayer`).
        nodes: simulations per move (>= 0); time_limit: seconds per move instead (or as well).
        device: torch device name (``"cpu"``, ``"cuda"``, ``"auto"``), for a checkpoint path.
        name: shown in results (default: ``<file stem>+search<nodes>``).
        seed: seed of the search's noise/sampling (and re-seeded by ``new_game(seed=...)``).
        threads: torch intra-op threads for this process (1 by default, as ModelPlayer;
            None = leave as is).
        **search_options: passed to :class:`keisei_stream.play.engine.mcts.MCTS` (``batch_size``,
            ``draw_plies``, ``c_init``, ``virtual_loss``, ``temperature``, ``dirichlet_alpha``,
            ``mate_search_plies``, ...). ``max_plies`` defaults to the model config's
            ``env.max_plies``.

    Raises:
        ValueError: neither ``nodes`` nor ``time_limit``, or a bad search option.
        keisei_stream.play.players.SpecError: the model cannot be loaded.

    ``choose`` returns a cshogi move code, ``"win"`` (entering-king declaration) or ``"resign"``
    (no legal move). The tree is kept between moves of a game (the opponent's reply is found in
    it through the board's history) and dropped by :meth:`new_game`. ``last_result`` holds the
    last :class:`keisei_stream.play.engine.tree.SearchResult`.
    """

    def __init__(self, source, nodes: Optional[int] = 800, *, time_limit: Optional[float] = None,
                 device: str = "cpu", name: Optional[str] = None, seed: int = 0,
                 threads: Optional[int] = 1, **search_options) -> None:
        if threads:
            torch.set_num_threads(threads)
        if nodes is None and time_limit is None:
            raise ValueError("SearchPlayer needs nodes or time_limit")
        model, config, self.meta, default = load_player_model(source, device)
        self.config = config
        self.nodes = None if nodes is None else int(nodes)
        self.time_limit = time_limit
        self.name = name or f"{default}+search{self.nodes if self.nodes is not None else f'{time_limit}s'}"
        search_options.setdefault("max_plies", int(config.env.max_plies))
        self.mcts = MCTS(model, None, seed=seed, **search_options)
        self.last_result: Optional[SearchResult] = None

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        """Drop the tree; reseed the search's generator with ``seed`` (if given)."""
        self.mcts.reset()
        if seed is not None:
            self.mcts.rng = np.random.default_rng(seed)

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]:
        """Search ``board`` (``ply``: moves since the game's start) and return the move (a cshogi
        code), ``"win"`` or ``"resign"``; the chosen child becomes the tree's root."""
        res = self.mcts.search(board, ply=ply, nodes=self.nodes, time_limit=self.time_limit)
        self.last_result = res
        if res.best_move == 0:
            return res.best_usi
        self.mcts.advance(res.best_move)
        return res.best_move

    def game_over(self, result: str) -> None:
        """Drop the tree."""
        self.mcts.reset()

    def close(self) -> None:
        """Drop the tree."""
        self.mcts.reset()
