"""PUCT Monte-Carlo tree search over the policy-value network (AlphaZero style), batched.

The search (Silver et al. 2018, "A general reinforcement learning algorithm that masters chess,
shogi and Go through self-play", Science 362:1140; the shogi reference is dlshogi / python-dlshogi2
by T. Yamaoka) repeats *simulations*: from the root it descends the tree choosing at each node the
move with the largest PUCT score, until it reaches a position that is not in the tree yet; that
position is valued exactly when the game is over there, else by the network (value head), its
legal moves get the network's policy as priors, and the value is backed up along the path.

Values and perspectives
    Every value is in [-1, 1]. The network's value ``v`` (``ActorCritic.forward``'s second output,
    ``(B,) float32``) is the expected outcome for the **side to move** of the position evaluated.
    An edge ``(s, a)`` stores ``N(s, a)`` (visits) and ``W(s, a)`` (sum of values) from the view of
    the side to move at ``s`` (the player choosing ``a``), so a leaf value ``v`` is added as ``-v``
    to the edge that leads to it, ``+v`` to the edge above, and so on (zero-sum negation).
    ``Q(s, a) = W(s, a) / N(s, a)``.

PUCT score (dlshogi's ``select_max_ucb_child``, the AlphaZero rule with a visit-dependent c)
    ``score(a) = Q(s, a) + c(s) * P(s, a) * sqrt(N(s)) / (1 + N(s, a))`` with
    ``N(s) = sum_b N(s, b)`` and ``c(s) = c_init + log((N(s) + c_base + 1) / c_base)``
    (AlphaZero pseudocode: ``c_init = 1.25, c_base = 19652``; dlshogi's USI defaults:
    ``C_init 1.44, C_base 28288`` and at the root ``C_init_root 1.16, C_base_root 25617``).
    **Those constants are for values in [0, 1]**; here values are in [-1, 1], twice the range, so
    the same search behaviour needs twice the exploration constant (``argmax(Q' + c' U)`` with
    ``Q' = 2Q - 1`` equals ``argmax(Q + c'/2 U)``). The defaults are dlshogi's, doubled:
    ``c_init = 2.88``, ``c_init_root = 2.32``; ``c_base`` (a visit count) is unchanged.
    When ``N(s) = 0`` dlshogi uses ``sqrt(N(s)) := 1``, so the first visit goes to the largest prior.

First-play urgency (FPU) of unvisited moves (Leela Zero / dlshogi "FPU reduction")
    ``Q(s, a) := max(-1, Q(s) - fpu_reduction * sqrt(sum of P(s, b) over visited b))`` where
    ``Q(s) = sum W / sum N`` over the edges of ``s``. dlshogi: ``C_fpu_reduction 0.27``,
    ``C_fpu_reduction_root 0.00`` on [0, 1] values; doubled here: ``0.54`` and ``0.0``.

Virtual loss (batched evaluation; Chaslot et al. 2008, "Parallel Monte-Carlo Tree Search",
used by AlphaGo/AlphaZero and dlshogi)
    While a simulation's leaf waits for the network, every edge on its path carries ``vl``
    virtual visits that count as losses for the player choosing the edge:
    ``N += vl, W -= vl`` (dlshogi adds to the visit count only, which on [0, 1] values is the same
    as adding losses). Other simulations of the same batch then prefer other paths. The backup
    removes it: ``N += 1 - vl, W += value + vl``. Default ``vl = 1`` (python-dlshogi2's
    ``VIRTUAL_LOSS``). A simulation that reaches a leaf already waiting in the batch
    ("collision") is undone (its virtual loss removed) and not counted; after more than
    ``batch_size // 2`` collisions the batch is evaluated early (python-dlshogi2's rule).

Simulations and visit counts (the convention the tests assert)
    The root is expanded by its own forward pass, which is **not** a simulation. Each simulation
    adds exactly one visit to exactly one root edge, whether its leaf was valued by the network or
    exactly (terminal). So after ``search(nodes=N)`` on a fresh tree, ``sum(visits) == N``; with a
    reused tree the earlier visits stay and ``N`` new ones are added. A node's own first visit is
    the one that evaluated it, so a child with ``n`` visits has ``n - 1`` visits below it.

Terminal positions (valued exactly, never by the network)
    The rules of training, checked after every move by the one referee
    (:func:`keisei_stream.shogi.judge`, through :func:`_game_end`), in its order:

    1. no legal move: checkmate, the side to move lost (-1);
    2. the position occurs for the 4th time in the game (cshogi Zobrist key; occurrences counted
       over the game's history before the root **plus** the path from the root) ->
       ``board.is_draw()``: ``REPETITION_WIN`` = the side to move wins (it was checked
       perpetually, +1), ``REPETITION_LOSE`` = it loses (-1), anything else a draw (0);
    3. ``board.is_nyugyoku()``: the side to move declares entering-king and wins (+1);
    4. ``ply >= draw_plies`` (plies since the game's start): draw (0).

    Optional exact extra (dlshogi checks short mates at every new leaf): with
    ``leaf_mate_in_1`` a leaf whose side to move (not in check) has a mate in one
    (``board.mate_move_in_1ply()``) is a win (+1) for it without a network call; the mate ends the
    game by rule 1 before any other rule applies, so the value is exact.

Root shortcuts
    No legal move -> ``"resign"``; ``board.is_nyugyoku()`` -> ``"win"`` (the USI entering-king
    declaration); with ``mate_search_plies >= 1`` and the side to move not in check,
    ``board.mate_move_in_1ply()``, then for 3, 5, ... up to ``mate_search_plies``
    ``board.mate_move(ply)`` (cshogi's odd-ply mate search), and a mate found is played at once.

Observations
    Leaves are encoded exactly like :func:`keisei_stream.shogi.encode_observation` (core46,
    ``(46, 9, 9) float32``, mover's frame) with ``ply`` = plies since the game's start and
    ``repetition`` = earlier occurrences of the position (game history + path), capped at 2, and
    ``max_plies`` = the model's training ``env.max_plies`` (plane 43 = ply / max_plies). cshogi
    writes the piece planes of each leaf into a preallocated batch buffer; the rest of the planes
    are written for the whole batch at once.

Tree storage
    One ``__slots__`` :class:`Node` per position, its edges in plain Python lists (moves, priors,
    visits, value sums) **sorted by decreasing prior**; children are created on their first visit.
    All unvisited edges of a node share the same Q (the FPU) and N = 0, so the best unvisited edge
    is the one with the largest prior: edges get their first visit in list order, and the PUCT
    argmax only needs the prefix ``[0, width)`` where ``width`` = last visited index + 2 (an exact
    shortcut, same argmax and same first-index tie-break as a scan of all edges), scanned in a
    Python loop. Measured on this machine (``benchmarks/search.py``, ``layout``: one selection plus
    the edge updates of one simulation, 80 edges): lists ~1-3 us for prefixes of 4-24 edges and
    ~9 us for all 80, per-node NumPy arrays ~8 us at any width up to 48 and ~12 us at 80 (NumPy's
    per-call overhead and slow scalar updates); converting the lists to NumPy for wide prefixes
    lost to the Python loop at every width up to 200. Whole searches (4 positions x 2,000
    simulations, a stand-in network, time outside the forward passes): ~53-59 us per simulation
    at batch 8-32 with lists against ~100-111 us with a per-node NumPy-array version of this
    module (both with the cyclic GC paused).
"""

from __future__ import annotations

import gc
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import cshogi
import numpy as np
import torch

from keisei_stream.play.loaders import load_player_model
from keisei_stream.play.players import STARTPOS
from keisei_stream.shogi import NUM_ACTIONS, NUM_PLANES, EndReason, judge, moves_to_actions

# The vectorised tail of the observation encoder (hands, side to move, ply, repetition and
# constant planes, plus the piece-plane permutation), shared with VecEnv. Private to the shogi
# layer: tests/test_search.py checks the result equals encode_observation, so a change there fails
# loudly here.
from keisei_stream.shogi.observation import _finish_planes


#: Defaults (values in [-1, 1]; see the module docstring for the sources and the doubling).
C_INIT = 2.88
C_BASE = 28288.0
C_INIT_ROOT = 2.32
C_BASE_ROOT = 25617.0
FPU_REDUCTION = 0.54
FPU_REDUCTION_ROOT = 0.0
VIRTUAL_LOSS = 1.0
#: AlphaZero's root Dirichlet noise for shogi (Silver et al. 2018, supplementary "Methods").
DIRICHLET_ALPHA_SHOGI = 0.15
DIRICHLET_EPSILON = 0.25


# ------------------------------------------------------------------------------------------------
# game end


def _game_end(board: cshogi.Board, num_legal: int, occurrences: int, ply: int,
              draw_plies: int) -> Optional[tuple[EndReason, float]]:
    """Whether the game is over in ``board`` (the move into it was just played), judged by the
    one referee of training and matches (:func:`keisei_stream.shogi.judge`).

    Args:
        board: the position, with the game's moves in its history (``is_draw`` looks back).
        num_legal: number of legal moves of the side to move.
        occurrences: occurrences of this position in the game so far, this one included (1 = new).
        ply: plies played since the game's start, this move included.
        draw_plies: the game is a draw once ``ply >= draw_plies`` (0 = no limit).

    Returns:
        None if the game goes on, else ``(reason, value)`` with ``value`` in {-1, 0, +1} for the
        **side to move** of ``board``.
    """
    verdict = judge(board, occurrences, ply, draw_plies or sys.maxsize, num_legal > 0)
    return (verdict.reason, float(-verdict.mover_score)) if verdict else None


#: ``Node.reason`` of a leaf won by ``leaf_mate_in_1`` (not a game end yet: the mate is one ply on).
MATE_IN_1 = 100


# ------------------------------------------------------------------------------------------------
# tree


class Node:
    """One position of the tree.

    Attributes:
        key: cshogi Zobrist hash of the position (``int``; includes hands and side to move).
        terminal: exact value for the side to move when the game is over here (or won by a mate in
            one with ``leaf_mate_in_1``), else None.
        reason: :class:`EndReason` code (or :data:`MATE_IN_1`) of a terminal node, else 0.
        moves: legal moves, cshogi move codes (``list[int]``, K of them, sorted by decreasing
            prior); None until evaluated.
        prior: ``list[float]`` (K) policy over ``moves`` (softmax of the legal logits, sums to 1),
            non-increasing.
        n: ``list[float]`` (K) edge visit counts, virtual visits included while in flight.
        w: ``list[float]`` (K) edge value sums (side to move here), virtual losses included.
        n_sum, w_sum: ``sum(n)``, ``sum(w)`` kept incrementally.
        visited_p: sum of ``prior`` over edges selected at least once (FPU reduction).
        width: edges ``[0, width)`` can hold the PUCT argmax (last selected index + 2, at most K).
        children: ``{edge index: Node}`` for the edges visited at least once.
        pending: the node waits in the current batch for its network evaluation.
        value: the network's value for the side to move here (NaN for terminal nodes).
    """

    __slots__ = ("key", "terminal", "reason", "moves", "prior", "n", "w", "n_sum", "w_sum",
                 "visited_p", "width", "children", "pending", "value")

    def __init__(self, key: int) -> None:
        self.key = key
        self.terminal: Optional[float] = None
        self.reason = 0
        self.moves: Optional[list[int]] = None
        self.prior: Optional[list[float]] = None
        self.n: Optional[list[float]] = None
        self.w: Optional[list[float]] = None
        self.n_sum = 0.0
        self.w_sum = 0.0
        self.visited_p = 0.0
        self.width = 1
        self.children: dict[int, Node] = {}
        self.pending = False
        self.value = math.nan

    def child_index(self, move: int) -> int:
        """Edge index of ``move`` (compared on its low 16 bits, cshogi's ``move16``); -1 if absent."""
        if self.moves is None:
            return -1
        m16 = int(move) & 0xFFFF
        for i, m in enumerate(self.moves):
            if m & 0xFFFF == m16:
                return i
        return -1

    def reorder(self, perm: Sequence[int]) -> None:
        """Permute the edges: new edge ``j`` is old edge ``perm[j]`` (children re-keyed, ``width``
        recomputed). Used to keep the edges sorted by prior after root noise."""
        inv = {old: new for new, old in enumerate(perm)}
        self.moves = [self.moves[i] for i in perm]
        self.prior = [self.prior[i] for i in perm]
        self.n = [self.n[i] for i in perm]
        self.w = [self.w[i] for i in perm]
        self.children = {inv[i]: c for i, c in self.children.items()}
        last = max([j for j, v in enumerate(self.n) if v != 0.0] + list(self.children), default=-1)
        self.width = min(len(self.moves), last + 2)


# ------------------------------------------------------------------------------------------------
# results


@dataclass
class SearchResult:
    """Outcome of :meth:`MCTS.search` (also passed, partial, to the ``info`` callback).

    Attributes:
        best_move: cshogi move code to play; 0 when ``best_usi`` is ``"resign"`` or ``"win"``.
        best_usi: the move in USI, or ``"resign"`` (no legal move) / ``"win"`` (entering-king
            declaration).
        moves: the root's legal moves (cshogi codes, by decreasing prior); empty after a shortcut.
        visits: ``(K,) int64`` visits of each root move (all of the tree's, reused ones included).
        q: ``(K,) float32`` mean value of each root move for the side to move (NaN if unvisited).
        prior: ``(K,) float32`` the network's policy at the root (with Dirichlet noise if used).
        value: value of ``best_move`` for the side to move in [-1, 1] (its Q; 1.0 for a found mate,
            the network's root value when nothing was visited).
        root_value: mean of all values backed up through the root (side to move), or the
            network's root value before any simulation.
        pv: principal variation in USI (most visited child at each level).
        nodes: simulations run by this call.
        total_visits: ``visits.sum()``.
        evaluations: network evaluations (positions through the forward pass) in this call.
        terminal_hits: simulations of this call that ended on a terminal node.
        collisions: simulations undone because their leaf was already waiting in the batch.
        batches: forward passes in this call (the root's included).
        reused_visits: root visits kept from the previous search (tree reuse).
        depth: length of ``pv``; seldepth: deepest simulation of this call (plies from the root).
        elapsed: wall seconds of this call; nps: ``nodes / elapsed``.
        forward_seconds: seconds spent in the forward passes (model call + gathering the legal
            logits and values to the host).
        mate_in: plies of the mate found by the root mate search (1, 3, ...), else None.
        stopped: the search ended on the stop flag (not on its node or time budget).
    """

    best_move: int
    best_usi: str
    moves: list[int] = field(default_factory=list)
    visits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    q: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    prior: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    value: float = 0.0
    root_value: float = 0.0
    pv: list[str] = field(default_factory=list)
    nodes: int = 0
    total_visits: int = 0
    evaluations: int = 0
    terminal_hits: int = 0
    collisions: int = 0
    batches: int = 0
    reused_visits: int = 0
    depth: int = 0
    seldepth: int = 0
    elapsed: float = 0.0
    nps: float = 0.0
    forward_seconds: float = 0.0
    mate_in: Optional[int] = None
    stopped: bool = False

    def visit_dict(self) -> dict[str, int]:
        """``{USI move: visits}`` of the root moves."""
        return {cshogi.move_to_usi(m): int(v) for m, v in zip(self.moves, self.visits.tolist())}

    @property
    def ponder_usi(self) -> Optional[str]:
        """The expected reply (``pv[1]``) for USI ``bestmove ... ponder ...``, else None."""
        return self.pv[1] if len(self.pv) > 1 else None


@dataclass
class SearchLimits:
    """The limits of a running search, read after every simulation and every batch, so another
    thread may change them while :meth:`MCTS.search` runs (USI ``ponderhit``: the search started
    without limits gets its time budget from that moment). Plain attribute writes; no lock needed.

    Attributes:
        nodes: simulations of this :meth:`MCTS.search` call to run, or None (no node limit).
        deadline: ``time.perf_counter()`` value at which the search ends, or None (no time limit).
    """

    nodes: Optional[int] = None
    deadline: Optional[float] = None


# ------------------------------------------------------------------------------------------------
# leaf batch


class _LeafBatch:
    """Observations of up to ``capacity`` leaves, written one by one, finished once per batch.

    ``tensor``: ``(capacity, 46, 9, 9) float32`` (pinned host memory when ``pin``), ``obs`` its
    NumPy view. :meth:`add` writes cshogi's 28 piece planes of the board's current position (the
    search board is only there for a moment) and records hands, side to move, ply, repetition and
    the legal moves; :meth:`finish` writes the remaining planes for all rows at once (the same
    function as :func:`keisei_stream.shogi.encode_observation`) and maps the legal moves to action
    indices with one table lookup.
    """

    def __init__(self, capacity: int, max_plies: int, pin: bool = False) -> None:
        self.capacity = capacity
        self.max_plies = max_plies
        self.tensor = torch.zeros((capacity, NUM_PLANES, 9, 9), dtype=torch.float32, pin_memory=pin)
        self.obs = self.tensor.numpy()
        self._rows = [self.obs[i] for i in range(capacity)]
        self.size = 0
        self.hands: list[list[int]] = []
        self.turns: list[int] = []
        self.plies: list[int] = []
        self.reps: list[int] = []
        self.moves: list[int] = []
        self.counts: list[int] = []

    def clear(self) -> None:
        if self.size:
            self.obs[: self.size, :28] = 0.0
        self.size = 0
        self.hands.clear()
        self.turns.clear()
        self.plies.clear()
        self.reps.clear()
        self.moves.clear()
        self.counts.clear()

    def add(self, board: cshogi.Board, ply: int, repetition: int, legal: list[int]) -> int:
        """Record ``board``'s position (``legal``: its legal moves); returns its row."""
        i = self.size
        board.piece_planes_rotate(self._rows[i])
        black, white = board.pieces_in_hand
        t = board.turn
        self.hands.append(black + white if t == 0 else white + black)
        self.turns.append(t)
        self.plies.append(ply)
        self.reps.append(repetition)
        self.moves.extend(legal)
        self.counts.append(len(legal))
        self.size = i + 1
        return i

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(obs (k, 46, 9, 9) float32 view, moves (M,) int64, actions (M,) int64,
        counts (k,) int64)``: the legal moves of the k rows back to back (cshogi codes and action
        indices) and the number of moves per row."""
        k = self.size
        turns = np.array(self.turns, dtype=np.int64)
        _finish_planes(self.obs[:k], np.array(self.hands, dtype=np.int64), turns,
                       np.array(self.plies, dtype=np.int64), np.array(self.reps, dtype=np.int64),
                       self.max_plies)
        counts = np.array(self.counts, dtype=np.int64)
        moves = np.array(self.moves, dtype=np.int64)
        actions = moves_to_actions(moves, np.repeat(turns, counts))
        return self.obs[:k], moves, actions, counts


# ------------------------------------------------------------------------------------------------
# the search


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
        max_plies: the model's training ``env.max_plies`` (plane 43 = ply / max_plies).
        draw_plies: the game length limit of rule 4 (:func:`_game_end`); None = ``max_plies``
            (the training rule), 0 = no limit.
        batch_size: leaves per forward pass (>= 1).
        c_init, c_base, c_init_root, c_base_root: PUCT exploration (module docstring).
        fpu_reduction, fpu_reduction_root: first-play urgency reduction (module docstring).
        virtual_loss: virtual losses per in-flight edge (>= 0; 0 makes a batch mostly collide).
        policy_temperature: priors = softmax(legal logits / policy_temperature) (> 0; dlshogi
            tunes a "Softmax_Temperature", 1.0 = the network's own policy).
        mate_search_plies: root mate search depth (0 off, 1 mate in one, 3/5/... also
            ``board.mate_move(ply)`` for each odd ply up to it).
        leaf_mate_in_1: value leaves with a mate in one as won (exact, ~0.3 us per leaf).
        dirichlet_alpha: root noise ``P = (1 - eps) P + eps Dir(alpha)`` at every search when set
            (AlphaZero: alpha 0.15 for shogi, eps 0.25); None (default) = no noise.
        dirichlet_epsilon: the ``eps`` above.
        temperature: move choice; 0 (default) = most visits (ties: higher Q, then prior); > 0
            samples a root move with probability proportional to ``visits ** (1 / temperature)``.
        reuse_tree: keep the subtree of the position reached between searches.
        max_tree_visits: the search ends once the root has this many visits (each visit adds at
            most one node; a node costs ~3 KB with 30 legal moves, ~6 KB with 80, so the default
            1,000,000 bounds the tree to a few GB during ``go infinite``).
        amp: bf16 autocast for the forward pass on CUDA (ignored on CPU).
        seed: seed of the noise / sampling generator.

    Thread safety: :meth:`search` runs in one thread at a time; :meth:`stop` (or setting the
    ``stop_event`` given to :meth:`search`) may be called from any thread and takes effect after
    the batch in flight (one forward pass).
    """

    def __init__(self, model: torch.nn.Module, device: Union[torch.device, str, None] = None, *,
                 max_plies: int, draw_plies: Optional[int] = None, batch_size: int = 16,
                 c_init: float = C_INIT, c_base: float = C_BASE, c_init_root: float = C_INIT_ROOT,
                 c_base_root: float = C_BASE_ROOT, fpu_reduction: float = FPU_REDUCTION,
                 fpu_reduction_root: float = FPU_REDUCTION_ROOT, virtual_loss: float = VIRTUAL_LOSS,
                 policy_temperature: float = 1.0, mate_search_plies: int = 1,
                 leaf_mate_in_1: bool = True, dirichlet_alpha: Optional[float] = None,
                 dirichlet_epsilon: float = DIRICHLET_EPSILON, temperature: float = 0.0,
                 reuse_tree: bool = True, max_tree_visits: int = 1_000_000, amp: bool = False,
                 seed: int = 0) -> None:
        if int(max_plies) != max_plies or max_plies < 1:
            raise ValueError(f"max_plies must be a positive integer, got {max_plies!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not virtual_loss >= 0:
            raise ValueError(f"virtual_loss must be >= 0, got {virtual_loss!r}")
        if not policy_temperature > 0:
            raise ValueError(f"policy_temperature must be > 0, got {policy_temperature!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if mate_search_plies < 0:
            raise ValueError(f"mate_search_plies must be >= 0, got {mate_search_plies!r}")
        if dirichlet_alpha is not None and not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha!r}")
        if c_base <= 0 or c_base_root <= 0:
            raise ValueError("c_base and c_base_root must be > 0")
        p = next(iter(model.parameters()), None)
        current = p.device if p is not None else torch.device("cpu")
        self.device = current if device is None else torch.device(device)
        if self.device != current:
            model = model.to(self.device)
        self.model = model.eval()
        self.max_plies = int(max_plies)
        self.draw_plies = self.max_plies if draw_plies is None else int(draw_plies)
        self.batch_size = int(batch_size)
        self.c_init, self.c_base = float(c_init), float(c_base)
        self.c_init_root, self.c_base_root = float(c_init_root), float(c_base_root)
        self.fpu_reduction, self.fpu_reduction_root = float(fpu_reduction), float(fpu_reduction_root)
        self.virtual_loss = float(virtual_loss)
        self.policy_temperature = float(policy_temperature)
        self.mate_search_plies = int(mate_search_plies)
        self.leaf_mate_in_1 = bool(leaf_mate_in_1)
        self.dirichlet_alpha = dirichlet_alpha
        self.dirichlet_epsilon = float(dirichlet_epsilon)
        self.temperature = float(temperature)
        self.reuse_tree = bool(reuse_tree)
        if int(max_tree_visits) != max_tree_visits or max_tree_visits < 1:
            raise ValueError(f"max_tree_visits must be >= 1, got {max_tree_visits!r}")
        self.max_tree_visits = int(max_tree_visits)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.rng = np.random.default_rng(seed)
        self._batch = _LeafBatch(self.batch_size, self.max_plies, pin=self.device.type == "cuda")
        self._root: Optional[Node] = None
        self._root_history: list[int] = []   # move16 of the game's moves before the root
        self._root_ply = 0
        self._root_raw_prior: Optional[np.ndarray] = None
        self._stop_event: Optional[threading.Event] = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- tree state
    @property
    def root(self) -> Optional[Node]:
        """The current root node (None before the first search or after :meth:`reset`)."""
        return self._root

    def reset(self) -> None:
        """Forget the tree (a new game, or a position unrelated to the last one)."""
        self._root = None
        self._root_history = []
        self._root_raw_prior = None

    def advance(self, move: Union[int, str]) -> bool:
        """Make the child reached by ``move`` (cshogi code or USI) the root, keeping its subtree.

        Returns:
            True when that child was in the tree (its visits are kept), False when the tree was
            dropped (the next search starts from scratch).
        """
        root = self._root
        if root is None:
            return False
        if isinstance(move, str):
            idx = -1
            if root.moves is not None:
                for i, m in enumerate(root.moves):
                    if cshogi.move_to_usi(m) == move:
                        idx = i
                        break
        else:
            idx = root.child_index(move)
        child = root.children.get(idx) if idx >= 0 else None
        if child is None or child.moves is None or child.terminal is not None:
            self.reset()
            return False
        self._root_history.append(root.moves[idx] & 0xFFFF)
        self._root_ply += 1
        self._root = child
        self._root_raw_prior = None
        return True

    def stop(self) -> None:
        """Ask the running search to stop after its current batch (thread-safe)."""
        ev = self._stop_event
        if ev is not None:
            ev.set()

    def _sync_root(self, board: cshogi.Board, ply: int, history16: list[int]) -> Optional[Node]:
        """The node of ``board`` in the kept tree (descending through the moves played since the
        last root), or None. The game's history must extend the root's, with the same ply base."""
        root = self._root
        if root is None or not self.reuse_tree:
            return None
        old = self._root_history
        if len(history16) < len(old) or history16[: len(old)] != old:
            return None
        if ply - len(history16) != self._root_ply - len(old):
            return None
        node = root
        for m in history16[len(old):]:
            child = node.children.get(node.child_index(m))
            if child is None or child.moves is None or child.terminal is not None:
                return None
            node = child
        if node.key != board.zobrist_hash() or node.moves is None:
            return None
        if node is not root:
            self._root_raw_prior = None
        return node

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
            time_limit: seconds of wall time (checked after each batch).
            stop_event: stops the search after the current batch when set (thread-safe);
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
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                if limits is None:
                    t_start = time.perf_counter()
                    limits = SearchLimits(None if nodes is None else int(nodes),
                                          None if time_limit is None else t_start + float(time_limit))
                return self._search(board, ply, limits, stop, info, info_interval)
            except BaseException:
                # a failed forward pass (or an interrupt) leaves virtual losses and pending nodes
                self.reset()
                raise
            finally:
                self._stop_event = None
                if gc_was_enabled:
                    gc.enable()

    def _search(self, board, ply, limits: SearchLimits, stop, info, info_interval) -> SearchResult:
        t0 = time.perf_counter()
        history = board.history
        ply = len(history) if ply is None else int(ply)
        legal = list(board.legal_moves)
        if not legal:
            self.reset()
            return SearchResult(0, "resign", value=-1.0, root_value=-1.0, elapsed=time.perf_counter() - t0)
        if board.is_nyugyoku():
            self.reset()
            return SearchResult(0, "win", value=1.0, root_value=1.0, elapsed=time.perf_counter() - t0)
        mate = self._root_mate(board)
        if mate is not None:
            move, plies = mate
            usi = cshogi.move_to_usi(move)
            self.reset()
            return SearchResult(move, usi, value=1.0, root_value=1.0, pv=[usi], depth=1, seldepth=1,
                                mate_in=plies, elapsed=time.perf_counter() - t0)

        history16 = [m & 0xFFFF for m in history]
        root = self._sync_root(board, ply, history16)
        # occurrences of each position in the game before the root, the root included
        sb = board.copy()
        counts: dict[int, int] = {}
        for _ in range(len(history)):
            k = sb.zobrist_hash()
            counts[k] = counts.get(k, 0) + 1
            sb.pop()
        k = sb.zobrist_hash()
        counts[k] = counts.get(k, 0) + 1
        root_key = board.zobrist_hash()
        stats = _Stats()
        if root is None:
            root = Node(root_key)
            rep = min(counts[root_key] - 1, 2)
            self._batch.clear()
            self._batch.add(board, ply, rep, legal)
            self._evaluate([(root, [])], stats)
            self._root_raw_prior = None
        self._root = root
        self._root_history = history16
        self._root_ply = ply
        if self.dirichlet_alpha is not None:
            self._add_noise(root)
        reused = int(root.n_sum)

        self._board = board.copy()
        self._counts = counts
        self._ply0 = ply
        next_info = t0 + info_interval
        batch = self._batch
        bs = self.batch_size
        max_collisions = bs // 2
        stopped = False
        while True:
            target = limits.nodes
            if target is not None and stats.sims >= target:
                break
            if stop.is_set():
                stopped = True
                break
            deadline = limits.deadline
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if root.n_sum >= self.max_tree_visits:
                break
            batch.clear()
            queued: list[tuple[Node, list]] = []
            collisions = 0
            while len(queued) < bs:
                target = limits.nodes
                if target is not None and stats.sims + len(queued) >= target:
                    break
                if root.n_sum >= self.max_tree_visits:
                    break
                outcome = self._simulate(root, queued, stats)
                if outcome < 0:
                    collisions += 1
                    stats.collisions += 1
                    if collisions > max_collisions:
                        break
            if queued:
                self._evaluate(queued, stats)
                stats.sims += len(queued)
            if info is not None and time.perf_counter() >= next_info:
                next_info = time.perf_counter() + info_interval
                info(self._result(root, stats, t0, reused, final=False))
        self._board = None
        res = self._result(root, stats, t0, reused, final=True)
        res.stopped = stopped
        return res

    def _add_noise(self, root: Node) -> None:
        """Root priors := (1 - eps) * network priors + eps * Dirichlet(alpha) noise, fresh at each
        search (AlphaZero), edges re-sorted by the noisy prior."""
        if self._root_raw_prior is None:
            self._root_raw_prior = np.array(root.prior, dtype=np.float64)
        raw = self._root_raw_prior
        noise = self.rng.dirichlet(np.full(len(raw), self.dirichlet_alpha))
        eps = self.dirichlet_epsilon
        noisy = (1.0 - eps) * raw + eps * noise
        perm = np.argsort(-noisy, kind="stable")
        root.prior = noisy.tolist()
        root.reorder(perm.tolist())
        self._root_raw_prior = raw[perm]

    def _root_mate(self, board: cshogi.Board) -> Optional[tuple[int, int]]:
        """cshogi's mate search at the root: ``(move, plies)`` of a verified mate, else None."""
        if self.mate_search_plies < 1 or board.is_check():
            return None
        m = board.mate_move_in_1ply()
        if m and board.is_legal(m):
            board.push(m)
            mated = len(board.legal_moves) == 0
            board.pop()
            if mated:
                return int(m), 1
        for plies in range(3, self.mate_search_plies + 1, 2):
            m = board.mate_move(plies)
            if m and board.is_legal(m):
                return int(m), plies
        return None

    # -------------------------------------------------------------------------------- one simulation
    def _simulate(self, root: Node, queued: list, stats: "_Stats") -> int:
        """Descend from ``root`` to a new or terminal node. Returns 1 when a leaf was queued for
        the network, 0 when a terminal value was backed up at once, -1 on a collision (undone)."""
        board = self._board
        counts = self._counts
        vl = self.virtual_loss
        path: list[tuple[Node, int]] = []
        keys: list[int] = []
        node = root
        is_root = True
        outcome = 0
        while True:
            idx = self._select(node, is_root)
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
                else:
                    stats.terminal_hits += 1
                    stats.sims += 1
                    self._backup(path, child.terminal)
                break
            if child.terminal is not None:
                stats.terminal_hits += 1
                stats.sims += 1
                self._backup(path, child.terminal)
                break
            if child.pending:
                self._undo(path)
                outcome = -1
                break
            key = child.key
            counts[key] = counts.get(key, 0) + 1
            keys.append(key)
            node = child
        depth = len(path)
        if depth > stats.seldepth:
            stats.seldepth = depth
        for _ in range(depth):
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
        end = _game_end(board, len(legal), occurrences, ply, self.draw_plies)
        if end is not None:
            node.reason, node.terminal = int(end[0]), end[1]
            return node
        if self.leaf_mate_in_1 and not board.is_check():
            m = board.mate_move_in_1ply()
            if m:
                node.reason, node.terminal = MATE_IN_1, 1.0
                return node
        self._batch.add(board, ply, min(occurrences - 1, 2), legal)
        return node

    def _select(self, node: Node, is_root: bool) -> int:
        """Edge index with the largest PUCT score (module docstring), virtual losses included.

        Scans the prefix ``[0, node.width)`` (edges sorted by prior; see "Tree storage") in a
        Python loop. Ties go to the lowest index.
        """
        total = node.n_sum
        if total <= 0.0:
            return 0
        if is_root:
            c = self.c_init_root + math.log((total + self.c_base_root + 1.0) / self.c_base_root)
            red = self.fpu_reduction_root
        else:
            c = self.c_init + math.log((total + self.c_base + 1.0) / self.c_base)
            red = self.fpu_reduction
        fpu = node.w_sum / total - red * math.sqrt(node.visited_p)
        if fpu < -1.0:
            fpu = -1.0
        k = c * math.sqrt(total)
        width = node.width
        n, w, p = node.n, node.w, node.prior
        best = -math.inf
        bi = 0
        for i in range(width):
            ni = n[i]
            if ni > 0.0:
                sc = w[i] / ni + k * p[i] / (1.0 + ni)
            else:
                sc = fpu + k * p[i]
            if sc > best:
                best = sc
                bi = i
        return bi

    def _backup(self, path: list, leaf_value: float) -> None:
        """Add ``leaf_value`` (side to move at the leaf) along ``path``, removing virtual losses."""
        vl = self.virtual_loss
        v = -leaf_value
        for node, idx in reversed(path):
            node.n[idx] += 1.0 - vl
            node.w[idx] += v + vl
            node.n_sum += 1.0 - vl
            node.w_sum += v + vl
            v = -v

    def _undo(self, path: list) -> None:
        """Remove the virtual losses of a collided simulation."""
        vl = self.virtual_loss
        for node, idx in path:
            node.n[idx] -= vl
            node.w[idx] += vl
            node.n_sum -= vl
            node.w_sum += vl

    # -------------------------------------------------------------------------------- network
    def _evaluate(self, queued: list, stats: "_Stats") -> None:
        """One forward pass over the batch: priors and values into the queued nodes, then backup.

        Priors: ``softmax(legal logits / policy_temperature)`` per leaf, computed on the host over
        the legal entries only (segment max / sum with ``np.maximum.reduceat`` /
        ``np.add.reduceat``); the edges of each leaf are sorted by decreasing prior with one
        ``np.lexsort`` over the batch.
        """
        obs, moves, actions, counts = self._batch.finish()
        k = len(counts)
        offsets = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = np.repeat(np.arange(k, dtype=np.int64), counts)
        flat = rows * NUM_ACTIONS + actions
        dev = self.device
        t = time.perf_counter()
        with torch.inference_mode():
            x = self._batch.tensor[:k].to(dev, non_blocking=True)
            if self.amp:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits, value = self.model(x)
            else:
                logits, value = self.model(x)
            idx = torch.from_numpy(flat).to(dev, non_blocking=True)
            legal_logits = logits.reshape(-1).index_select(0, idx).float().cpu().numpy()
            values = value.float().reshape(-1).cpu().numpy()
        stats.forward_seconds += time.perf_counter() - t
        stats.evaluations += k
        stats.batches += 1
        z = legal_logits.astype(np.float64)
        if self.policy_temperature != 1.0:
            z /= self.policy_temperature
        starts = offsets[:-1]
        z -= np.repeat(np.maximum.reduceat(z, starts), counts)
        e = np.exp(z)
        e /= np.repeat(np.add.reduceat(e, starts), counts)
        order = np.lexsort((-e, rows))  # by leaf, then decreasing prior (stable: generation order)
        probs = e[order].tolist()
        moves = moves[order].tolist()
        values = values.tolist()
        bounds = offsets.tolist()
        backup = self._backup
        for i, (node, path) in enumerate(queued):
            a, b = bounds[i], bounds[i + 1]
            node.moves = moves[a:b]
            node.prior = probs[a:b]
            node.n = [0.0] * (b - a)
            node.w = [0.0] * (b - a)
            node.pending = False
            v = values[i]
            node.value = v
            if path:
                backup(path, v)

    # -------------------------------------------------------------------------------- results
    def _choose(self, root: Node) -> int:
        """The root edge to play: a move that wins at once (the opponent's node is a terminal
        loss), else the most visited (ties: higher Q, then higher prior), or with
        ``temperature > 0`` a sample with probability proportional to ``visits ** (1 / T)``."""
        for idx, child in root.children.items():
            if child.terminal is not None and child.terminal < 0:
                return idx
        visits = np.array(root.n)
        if visits.sum() <= 0:
            return 0
        if self.temperature > 0:
            p = visits ** (1.0 / self.temperature)
            p /= p.sum()
            return int(self.rng.choice(len(p), p=p))
        q = np.divide(np.array(root.w), visits, out=np.full(visits.shape, -2.0), where=visits > 0)
        order = np.lexsort((np.array(root.prior), q, visits))
        return int(order[-1])

    @staticmethod
    def _most_visited(node: Node) -> int:
        n = node.n
        return max(range(len(n)), key=n.__getitem__)

    def _pv(self, root: Node, first: int) -> list[str]:
        pv = [cshogi.move_to_usi(root.moves[first])]
        node = root.children.get(first)
        while node is not None and node.moves is not None and node.terminal is None and node.n_sum > 0:
            idx = self._most_visited(node)
            pv.append(cshogi.move_to_usi(node.moves[idx]))
            node = node.children.get(idx)
            if len(pv) >= 64:
                break
        return pv

    def _result(self, root: Node, stats: "_Stats", t0: float, reused: int, final: bool) -> SearchResult:
        if final:
            best = self._choose(root)
        else:
            best = self._most_visited(root) if root.n_sum > 0 else 0
        n = np.array(root.n)
        visits = np.rint(n).astype(np.int64)
        q = np.divide(np.array(root.w), n, out=np.full(n.shape, np.nan), where=n > 0).astype(np.float32)
        total = int(visits.sum())
        elapsed = time.perf_counter() - t0
        pv = self._pv(root, best)
        value = float(q[best]) if visits[best] > 0 else root.value
        root_value = float(root.w_sum / root.n_sum) if root.n_sum > 0 else root.value
        return SearchResult(
            best_move=int(root.moves[best]), best_usi=cshogi.move_to_usi(root.moves[best]),
            moves=list(root.moves), visits=visits, q=q, prior=np.array(root.prior, dtype=np.float32),
            value=value, root_value=root_value, pv=pv, nodes=stats.sims, total_visits=total,
            evaluations=stats.evaluations, terminal_hits=stats.terminal_hits, collisions=stats.collisions,
            batches=stats.batches, reused_visits=reused, depth=len(pv), seldepth=stats.seldepth,
            elapsed=elapsed, nps=stats.sims / elapsed if elapsed > 0 else 0.0,
            forward_seconds=stats.forward_seconds,
        )


class _Stats:
    __slots__ = ("sims", "evaluations", "terminal_hits", "collisions", "batches", "seldepth", "forward_seconds")

    def __init__(self) -> None:
        self.sims = 0
        self.evaluations = 0
        self.terminal_hits = 0
        self.collisions = 0
        self.batches = 0
        self.seldepth = 0
        self.forward_seconds = 0.0


# ------------------------------------------------------------------------------------------------
# player


class SearchPlayer:
    """The tree search as a :class:`keisei_stream.play.players.Player` (``nodes`` simulations a move).

    Args:
        source: a checkpoint path, or a ``(model, config[, meta])`` tuple already loaded (as
            :class:`keisei_stream.play.players.ModelPlayer`).
        nodes: simulations per move (>= 0); time_limit: seconds per move instead (or as well).
        device: torch device name (``"cpu"``, ``"cuda"``, ``"auto"``), for a checkpoint path.
        name: shown in results (default: ``<file stem>+search<nodes>``).
        seed: seed of the search's noise/sampling (and re-seeded by ``new_game(seed=...)``).
        threads: torch intra-op threads for this process (1 by default, as ModelPlayer;
            None = leave as is).
        **search_options: passed to :class:`MCTS` (``batch_size``, ``c_init``, ``virtual_loss``,
            ``temperature``, ``dirichlet_alpha``, ``mate_search_plies``, ...). ``max_plies``
            defaults to the model config's ``env.max_plies``.

    ``choose`` returns a cshogi move code, ``"win"`` (entering-king declaration) or ``"resign"``
    (no legal move). The tree is kept between moves of a game (the opponent's reply is found in
    it through the board's history) and dropped by :meth:`new_game`. ``last_result`` holds the
    last :class:`SearchResult`.
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
        self.mcts.reset()
        if seed is not None:
            self.mcts.rng = np.random.default_rng(seed)

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]:
        res = self.mcts.search(board, ply=ply, nodes=self.nodes, time_limit=self.time_limit)
        self.last_result = res
        if res.best_move == 0:
            return res.best_usi
        self.mcts.advance(res.best_move)
        return res.best_move

    def game_over(self, result: str) -> None:
        self.mcts.reset()

    def close(self) -> None:
        self.mcts.reset()


_SPEC_INT = ("nodes", "batch_size", "mate_search_plies", "seed", "threads", "draw_plies", "max_plies",
             "max_tree_visits")
_SPEC_FLOAT = ("time_limit", "c_init", "c_base", "c_init_root", "c_base_root", "fpu_reduction",
               "fpu_reduction_root", "virtual_loss", "policy_temperature", "temperature",
               "dirichlet_alpha", "dirichlet_epsilon")
_SPEC_BOOL = ("leaf_mate_in_1", "reuse_tree", "amp")


def search_player_from_spec(body: Union[str, tuple], options: dict, *, seed: int = 0,
                            device: str = "cpu") -> SearchPlayer:
    """Build a :class:`SearchPlayer` from a parsed spec ``search:PATH;nodes=N;...`` (body = PATH,
    or a loaded ``(model, config, meta)`` for ``redis:...;nodes=N``; options = the ``key=value``
    pairs; ``device`` and ``name`` as for checkpoint players, every :class:`MCTS` keyword
    accepted; ``time_limit`` without ``nodes`` searches for that many seconds a move). For
    :func:`keisei_stream.play.specs.make_player`.

    Raises:
        ValueError: unknown option or unparsable value.
    """
    kw: dict = {}
    dev = options.get("device", device)
    name = options.get("name")
    for k, v in options.items():
        if k in ("device", "name"):
            continue
        try:
            if k in _SPEC_INT:
                kw[k] = int(v)
            elif k in _SPEC_FLOAT:
                kw[k] = float(v)
            elif k in _SPEC_BOOL:
                if v.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(v)
                kw[k] = v.lower() in ("1", "true", "yes", "on")
            else:
                raise ValueError(f"unknown search player option {k!r}")
        except ValueError as exc:
            raise ValueError(f"search player option {k}={v!r}: {exc}") from None
    kw.setdefault("seed", seed)
    if "time_limit" in kw and "nodes" not in kw:
        kw["nodes"] = None
    return SearchPlayer(body, device=dev, name=name, **kw)
