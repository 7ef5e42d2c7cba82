"""PUCT Monte-Carlo tree search over the policy-value network (AlphaZero style), batched.

The search (Silver et al. 2018, "A general reinforcement learning algorithm that masters chess,
shogi and Go through self-play", Science 362:1140; the shogi reference is dlshogi / python-dlshogi2
by T. Yamaoka) repeats *simulations*: from the root it descends the tree choosing at each node the
move with the largest PUCT score, until it reaches a position that is not in the tree yet; that
position is valued exactly when the game is over there, else by the network (value head), its
legal moves get the network's policy as priors, and the value is backed up along the path. The
tree, its values, terminal rules and the tree kept between searches:
:mod:`keisei_stream.play.engine.tree`; the PUCT choice, virtual loss, backup and root noise:
:mod:`keisei_stream.play.engine.puct`; the batched network evaluation:
:mod:`keisei_stream.play.engine.leaves`; what the root answers without a search (no legal move,
entering king, a mate found, a forced move): :mod:`keisei_stream.play.engine.shortcuts`.

This module is the driver. :meth:`MCTS.search` answers from the root's shortcuts when it can,
else finds the root in the kept tree (or evaluates it), fills batch after batch of simulations
(``_simulate``: the PUCT descent with virtual losses to a new or terminal node), sends each batch
through one forward pass (``_evaluate``: priors and values into the queued nodes, then their
backups) until a limit, and chooses the root's move
(:func:`keisei_stream.play.engine.tree.choose_root_edge`). The descent, the batch and the limit
checks share one state, the virtual losses and pending nodes of the simulations in flight (a
leaf queued by ``_simulate`` is completed by ``_evaluate``), so they stay together here.

Limits
    Before every simulation the search reads the stop flag, the node budget (simulations that end
    on a terminal node count, as those queued for the network), the deadline and the tree size,
    so it ends within one simulation of a limit, plus the forward pass of the leaves already
    queued (one batch), even when no simulation reaches a new leaf (a solved tree, or every line
    ending on the move limit).
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Callable, Optional, Union

import cshogi
import numpy as np
import torch

from keisei_stream.play.engine.leaves import LeafBatch, evaluate_leaves
from keisei_stream.play.engine.puct import SearchOptions, add_root_noise, backup, select, undo
from keisei_stream.play.engine.shortcuts import answer_without_search
from keisei_stream.play.engine.tree import (
    KeptTree, Node, SearchLimits, SearchResult, SearchStats, choose_root_edge, exact_value, most_visited,
    position_counts, tree_result,
)


class MCTS:
    """Batched PUCT search with a policy-value network; keeps its tree between moves.

    Args:
        model: an ``ActorCritic`` (or any module with ``forward(obs (B, 46, 9, 9) float32) ->
            (logits (B, 13527), value (B,))``, value in [-1, 1] for the side to move). Put in eval
            mode; never trained here.
        device: where the model runs (None: the device of its parameters; a different device
            moves the model there with ``model.to``). Pick it at run time, e.g. with
            :func:`keisei_stream.rl.model.pick_device`. Inputs go there (from pinned host memory
            on CUDA); outputs come back to the host once per batch.
        max_plies: the model's training ``env.max_plies`` (plane 43 = ply / max_plies, later plies
            shown as ``max_plies - 1``: :func:`keisei_stream.play.engine.leaves.training_ply`).
        draw_plies: the game's move limit, rule 4 of :func:`keisei_stream.play.engine.tree.game_end`
            (a draw once ``ply >= draw_plies``); None = ``max_plies`` (the training rule, as in
            self-play; a match's players use it), 0 = no limit (the USI engine's default: its
            ``MaxMovesToDraw`` option sets it). May be changed between searches.
        batch_size: leaves per forward pass (>= 1).
        amp: bf16 autocast for the forward pass on CUDA (ignored on CPU).
        seed: seed of the noise / sampling generator.
        **options: the fields of :class:`keisei_stream.play.engine.puct.SearchOptions` (``c_init``,
            ``mate_search_plies``, ``temperature``, ...), kept in :attr:`options`.

    Raises:
        ValueError: a bad ``max_plies``, ``batch_size`` or option value.

    Thread safety: :meth:`search` runs in one thread at a time; :meth:`stop` (or setting the
    ``stop_event`` given to :meth:`search`) may be called from any thread and takes effect before
    the next simulation, after the forward pass of the leaves already queued.
    """

    def __init__(self, model: torch.nn.Module, device: Union[torch.device, str, None] = None, *,
                 max_plies: int, draw_plies: Optional[int] = None, batch_size: int = 16, amp: bool = False,
                 seed: int = 0, **options) -> None:
        if int(max_plies) != max_plies or max_plies < 1:
            raise ValueError(f"max_plies must be a positive integer, got {max_plies!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.options = SearchOptions(**options)
        p = next(iter(model.parameters()), None)
        current = p.device if p is not None else torch.device("cpu")
        self.device = current if device is None else torch.device(device)
        if self.device != current:
            model = model.to(self.device)
        self.model = model.eval()
        self.max_plies = int(max_plies)
        self.draw_plies = self.max_plies if draw_plies is None else int(draw_plies)
        self.batch_size = int(batch_size)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.rng = np.random.default_rng(seed)
        self._batch = LeafBatch(self.batch_size, self.max_plies, pin=self.device.type == "cuda")
        self._kept = KeptTree()
        self._stop_event: Optional[threading.Event] = None
        self._lock = threading.Lock()
        # the position being searched: a board the simulations push and pop on, occurrences of
        # each position in the game before the root, the root's ply
        self._board: Optional[cshogi.Board] = None
        self._counts: dict[int, int] = {}
        self._ply0 = 0

    # -------------------------------------------------------------------------------- tree state
    @property
    def root(self) -> Optional[Node]:
        """The current root node (None before the first search or after :meth:`reset`)."""
        return self._kept.root

    def reset(self) -> None:
        """Forget the tree (a new game, or a position unrelated to the last one)."""
        self._kept.reset()

    def advance(self, move: Union[int, str]) -> bool:
        """Make the child reached by ``move`` (cshogi code or USI) the root, keeping its subtree.

        Returns:
            True when that child was in the tree (its visits are kept), False when the tree was
            dropped (the next search starts from scratch).
        """
        return self._kept.advance(move)

    def stop(self) -> None:
        """Ask the running search to stop (thread-safe; before its next simulation)."""
        ev = self._stop_event
        if ev is not None:
            ev.set()

    # -------------------------------------------------------------------------------- search
    def search(self, board: cshogi.Board, *, ply: Optional[int] = None, nodes: Optional[int] = None,
               time_limit: Optional[float] = None, stop_event: Optional[threading.Event] = None,
               info: Optional[Callable[[SearchResult], None]] = None,
               info_interval: float = 1.0, limits: Optional[SearchLimits] = None) -> SearchResult:
        """Search ``board`` and return the move to play.

        Args:
            board: the position, its ``history`` holding the game's moves since the game's start
                position (used for repetitions and tree reuse); not modified.
            ply: plies since the game's start (plane 43, the ``draw_plies`` rule); None =
                ``len(board.history)``.
            nodes: simulations to run (>= 0). With neither ``nodes`` nor ``time_limit`` the search
                runs until ``stop_event`` is set (USI ``go infinite`` / ``go ponder``).
            time_limit: seconds of wall time (checked before every simulation).
            stop_event: stops the search when set (thread-safe; module docstring, "Limits");
                :meth:`stop` sets it too.
            info: called every ``info_interval`` seconds with the partial result (USI ``info``).
            limits: a :class:`SearchLimits` the caller keeps and may change from another thread
                while the search runs, instead of ``nodes`` / ``time_limit`` (give one or the other).

        Returns:
            :class:`SearchResult`.

        Raises:
            ValueError: no limit at all (no ``nodes``, ``time_limit`` or ``stop_event``), or a
                negative one.
        """
        if limits is not None:
            if nodes is not None or time_limit is not None:
                raise ValueError("give limits or nodes/time_limit, not both")
            nodes = limits.nodes
            if nodes is None and limits.deadline is None and stop_event is None:
                raise ValueError("search needs nodes, a deadline or a stop_event")
        elif nodes is None and time_limit is None and stop_event is None:
            raise ValueError("search needs nodes, time_limit or a stop_event")
        if nodes is not None and (int(nodes) != nodes or nodes < 0):
            raise ValueError(f"nodes must be an integer >= 0, got {nodes!r}")
        if time_limit is not None and not time_limit >= 0:
            raise ValueError(f"time_limit must be >= 0, got {time_limit!r}")
        with self._lock:
            stop = stop_event if stop_event is not None else threading.Event()
            self._stop_event = stop
            # The tree is acyclic (parents hold children, nothing points back), so reference
            # counting frees it; the cyclic collector only rescans the growing tree at every
            # allocation threshold (measured: ~30 % of the time outside the forward pass).
            collector_on = gc.isenabled()
            gc.disable()
            try:
                if limits is None:
                    limits = SearchLimits(None if nodes is None else int(nodes),
                                          None if time_limit is None else time.perf_counter() + float(time_limit))
                return self._search(board, ply, limits, stop, info, info_interval)
            except BaseException:
                # a failed forward pass (or an interrupt) leaves virtual losses and pending nodes
                self.reset()
                raise
            finally:
                self._stop_event = None
                self._board = None
                if collector_on:
                    gc.enable()

    def _search(self, board, ply, limits: SearchLimits, stop, info, info_interval) -> SearchResult:
        t0 = time.perf_counter()
        ply = len(board.history) if ply is None else int(ply)
        legal = list(board.legal_moves)
        counts = position_counts(board)
        history16 = [m & 0xFFFF for m in board.history]
        o = self.options
        early = answer_without_search(board, ply, legal, counts, draw_plies=self.draw_plies,
                                      mate_search_plies=o.mate_search_plies, leaf_mate_in_1=o.leaf_mate_in_1)
        if early is not None:
            # the only legal move keeps the tree: the reply may be searched in it already
            node = self._find_root(board, ply, history16) if early.shortcut == "one_legal_move" else None
            if node is None:
                self.reset()
            else:
                self._kept.set_root(node, history16, ply)
            early.elapsed = time.perf_counter() - t0
            return early
        stats = SearchStats()
        root = self._prepare_root(board, ply, legal, counts, history16, stats)
        reused = int(root.n_sum)
        stopped = self._run(root, limits, stop, stats, info, info_interval, t0, reused)
        best = choose_root_edge(root, self.options.temperature, self.rng)
        res = tree_result(root, best, stats, t0, reused)
        res.stopped = stopped
        return res

    def _find_root(self, board: cshogi.Board, ply: int, history16: list[int]) -> Optional[Node]:
        """The node of ``board`` in the kept tree (:meth:`KeptTree.find`), None with ``reuse_tree`` off."""
        return self._kept.find(board, ply, history16) if self.options.reuse_tree else None

    def _prepare_root(self, board: cshogi.Board, ply: int, legal: list[int], counts: dict[int, int],
                      history16: list[int], stats: SearchStats) -> Node:
        """The root node of ``board`` (from the kept tree, or evaluated now), with root noise if
        asked, and the search board, the game's position counts and the root ply set for the
        simulations."""
        kept = self._kept
        root = self._find_root(board, ply, history16)
        if root is None:
            root = Node(board.zobrist_hash())
            self._batch.clear()
            self._batch.add(board, ply, min(counts[root.key] - 1, 2), legal)
            self._evaluate([(root, [])], stats)
        kept.set_root(root, history16, ply)
        o = self.options
        if o.dirichlet_alpha is not None:
            kept.raw_prior = add_root_noise(root, kept.raw_prior, o.dirichlet_alpha, o.dirichlet_epsilon, self.rng)
        self._board = board.copy()
        self._counts = counts
        self._ply0 = ply
        return root

    def _run(self, root: Node, limits: SearchLimits, stop: threading.Event, stats: SearchStats, info,
             info_interval: float, t0: float, reused: int) -> bool:
        """Simulate batch after batch until a limit; returns True when ``stop`` ended it."""
        next_info = t0 + info_interval
        while True:
            reason = self._limit_reached(root, limits, stop, stats.sims)
            if reason:
                return reason == "stop"
            queued = self._fill_batch(root, limits, stop, stats)
            if queued:
                self._evaluate(queued, stats)
                stats.sims += len(queued)
            if info is not None and time.perf_counter() >= next_info:
                next_info = time.perf_counter() + info_interval
                best = most_visited(root) if root.n_sum > 0 else 0
                info(tree_result(root, best, stats, t0, reused))

    def _limit_reached(self, root: Node, limits: SearchLimits, stop: threading.Event, sims: int) -> str:
        """Which limit ends the search once ``sims`` simulations are done or queued: ``"stop"``,
        ``"nodes"``, ``"time"``, ``"tree"`` (``max_tree_visits``), or ``""`` (none). The limits
        are read afresh (another thread may change them: ``ponderhit``, ``stop``)."""
        if stop.is_set():
            return "stop"
        target = limits.nodes
        if target is not None and sims >= target:
            return "nodes"
        deadline = limits.deadline
        if deadline is not None and time.perf_counter() >= deadline:
            return "time"
        if root.n_sum >= self.options.max_tree_visits:
            return "tree"
        return ""

    def _fill_batch(self, root: Node, limits: SearchLimits, stop: threading.Event, stats: SearchStats) -> list:
        """Run simulations until ``batch_size`` leaves wait for the network, a limit is reached
        (checked before every simulation, so simulations that end on terminal nodes, which queue
        nothing, count toward the node budget and never outrun the clock or ``stop``), too many
        collisions, or ``4 * batch_size + 64`` simulations (then :meth:`_run` sends its ``info``);
        returns the queued ``(node, path)`` pairs."""
        self._batch.clear()
        queued: list[tuple[Node, list]] = []
        collisions = 0
        max_collisions = self.batch_size // 2
        for _ in range(4 * self.batch_size + 64):
            if len(queued) >= self.batch_size or self._limit_reached(root, limits, stop, stats.sims + len(queued)):
                break
            if self._simulate(root, queued, stats) < 0:
                collisions += 1
                stats.collisions += 1
                if collisions > max_collisions:
                    break
        return queued

    # -------------------------------------------------------------------------------- one simulation
    def _simulate(self, root: Node, queued: list, stats: SearchStats) -> int:
        """Descend from ``root`` to a new or terminal node. Returns 1 when a leaf was queued for
        the network, 0 when a terminal value was backed up at once, -1 on a collision (undone)."""
        board = self._board
        counts = self._counts
        options = self.options
        vl = options.virtual_loss
        path: list[tuple[Node, int]] = []
        keys: list[int] = []
        node = root
        is_root = True
        outcome = 0
        while True:
            idx = select(node, is_root, options)
            is_root = False
            n = node.n
            if n[idx] == 0.0:
                node.visited_p += node.prior[idx]
                if idx + 2 > node.width:
                    node.width = min(idx + 2, len(n))
            n[idx] += vl
            node.w[idx] -= vl
            node.n_sum += vl
            node.w_sum -= vl
            path.append((node, idx))
            board.push(node.moves[idx])
            child = node.children.get(idx)
            if child is None:
                child = self._new_node(board, counts, len(path))
                node.children[idx] = child
                if child.terminal is None:
                    child.pending = True
                    queued.append((child, path))
                    outcome = 1
                    break
            if child.terminal is not None:
                stats.terminal_hits += 1
                stats.sims += 1
                backup(path, child.terminal, vl)
                break
            if child.pending:
                undo(path, vl)
                outcome = -1
                break
            key = child.key
            counts[key] = counts.get(key, 0) + 1
            keys.append(key)
            node = child
        if len(path) > stats.seldepth:
            stats.seldepth = len(path)
        for _ in range(len(path)):
            board.pop()
        for key in keys:
            counts[key] -= 1
        return outcome

    def _new_node(self, board: cshogi.Board, counts: dict, depth: int) -> Node:
        """Create the node of ``board``'s position (just pushed, ``depth`` plies below the root):
        exact value when terminal, else written into the leaf batch."""
        key = board.zobrist_hash()
        node = Node(key)
        legal = list(board.legal_moves)
        occurrences = counts.get(key, 0) + 1
        ply = self._ply0 + depth
        end = exact_value(board, len(legal), occurrences, ply, self.draw_plies, self.options.leaf_mate_in_1)
        if end is not None:
            node.reason, node.terminal = end
            return node
        self._batch.add(board, ply, min(occurrences - 1, 2), legal)
        return node

    def _evaluate(self, queued: list, stats: SearchStats) -> None:
        """One forward pass over the batch (:func:`keisei_stream.play.engine.leaves.evaluate_leaves`):
        priors and values into the queued nodes, then the backup of each value."""
        out = evaluate_leaves(self.model, self._batch, self.device, amp=self.amp,
                              policy_temperature=self.options.policy_temperature)
        stats.forward_seconds += out.seconds
        stats.evaluations += len(queued)
        stats.batches += 1
        moves, priors, bounds, values = out.moves, out.priors, out.bounds, out.values
        vl = self.options.virtual_loss
        for i, (node, path) in enumerate(queued):
            a, b = bounds[i], bounds[i + 1]
            node.moves = moves[a:b]
            node.prior = priors[a:b]
            node.n = [0.0] * (b - a)
            node.w = [0.0] * (b - a)
            node.pending = False
            node.value = values[i]
            if path:
                backup(path, values[i], vl)
