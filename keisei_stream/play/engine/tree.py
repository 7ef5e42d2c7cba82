"""The search tree's data: nodes and edges, exact values of finished games, the tree kept between
searches (:class:`KeptTree`), the search's limits, counters and result.

Values and perspectives
    Every value is in [-1, 1]. The network's value ``v`` (``ActorCritic.forward``'s second output,
    ``(B,) float32``) is the expected outcome for the **side to move** of the position evaluated.
    An edge ``(s, a)`` stores ``N(s, a)`` (visits) and ``W(s, a)`` (sum of values) from the view of
    the side to move at ``s`` (the player choosing ``a``), so a leaf value ``v`` is added as ``-v``
    to the edge that leads to it, ``+v`` to the edge above, and so on (zero-sum negation).
    ``Q(s, a) = W(s, a) / N(s, a)``.

Simulations and visit counts (the convention the tests assert)
    The root is expanded by its own forward pass, which is **not** a simulation. Each simulation
    adds exactly one visit to exactly one root edge, whether its leaf was valued by the network or
    exactly (terminal). So after ``search(nodes=N)`` on a fresh tree, ``sum(visits) == N``; with a
    reused tree the earlier visits stay and ``N`` new ones are added. A node's own first visit is
    the one that evaluated it, so a child with ``n`` visits has ``n - 1`` visits below it.

Terminal positions (valued exactly, never by the network)
    The rules of training and matches, checked after every move by the one referee
    (:func:`keisei_stream.shogi.judge`, through :func:`game_end`), in its order:

    1. no legal move: checkmate, the side to move lost (-1);
    2. the position occurs for the 4th time in the game (cshogi Zobrist key; occurrences counted
       over the game's history before the root **plus** the path from the root) ->
       ``board.is_draw()``: ``REPETITION_WIN`` = the side to move wins (it was checked
       perpetually, +1), ``REPETITION_LOSE`` = it loses (-1), anything else a draw (0);
    3. the side to move can declare entering king and wins (+1);
    4. ``ply >= draw_plies`` (plies since the game's start): draw (0).

    Optional exact extra (dlshogi checks short mates at every new leaf): with
    ``leaf_mate_in_1`` a leaf whose side to move (not in check) has a mate in one
    (``board.mate_move_in_1ply()``) is a win (+1) for it without a network call; the mate ends the
    game by rule 1 before any other rule applies, so the value is exact. Both: :func:`exact_value`.

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
    at batch 8-32 with lists against ~100-111 us with a per-node NumPy-array version of the
    search (both with the cyclic GC paused).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import cshogi
import numpy as np

from keisei_stream.shogi import EndReason, judge

#: ``Node.reason`` of a leaf won by ``leaf_mate_in_1`` (not a game end yet: the mate is one ply on).
MATE_IN_1 = 100


def game_end(board: cshogi.Board, num_legal: int, occurrences: int, ply: int,
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


def exact_value(board: cshogi.Board, num_legal: int, occurrences: int, ply: int, draw_plies: int,
                leaf_mate_in_1: bool) -> Optional[tuple[int, float]]:
    """``(reason, exact value for the side to move)`` of a position just reached, or None when
    only the network can value it (module docstring, "Terminal positions").

    Args:
        board, num_legal, occurrences, ply, draw_plies: as :func:`game_end`.
        leaf_mate_in_1: a side to move (not in check) with a mate in one
            (``board.mate_move_in_1ply()``) wins: ``(MATE_IN_1, 1.0)``.

    Returns:
        :func:`game_end`'s ``(int(reason), value)``, else the mate in one, else None.
    """
    end = game_end(board, num_legal, occurrences, ply, draw_plies)
    if end is not None:
        return int(end[0]), end[1]
    if leaf_mate_in_1 and not board.is_check() and board.mate_move_in_1ply():
        return MATE_IN_1, 1.0
    return None


def position_counts(board: cshogi.Board) -> dict[int, int]:
    """Occurrences of each position of the game up to ``board``'s current one (included), keyed
    by cshogi's Zobrist key, from ``board.history`` (the game's moves since its start position)."""
    b = board.copy()
    counts: dict[int, int] = {}
    for _ in range(len(board.history) + 1):
        key = b.zobrist_hash()
        counts[key] = counts.get(key, 0) + 1
        if b.history:
            b.pop()
    return counts


# ------------------------------------------------------------------------------------------------
# nodes


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
        self.value = float("nan")

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


@dataclass
class KeptTree:
    """The tree kept between searches (tree reuse): its root, where that root stands in the game,
    and the network's root priors kept aside while the root carries Dirichlet noise.

    Attributes:
        root: the root of the last search (or the child :meth:`advance` moved to), None when
            there is no tree.
        history16: the game's moves before ``root`` (cshogi ``move16``), from the game's start
            position.
        ply: plies since the game's start at ``root``.
        raw_prior: ``(K,) float64`` the network's priors of ``root`` in its current edge order
            when its ``prior`` holds noise (:func:`keisei_stream.play.engine.puct.add_root_noise`),
            else None; dropped whenever ``root`` changes.
    """

    root: Optional[Node] = None
    history16: list[int] = field(default_factory=list)
    ply: int = 0
    raw_prior: Optional[np.ndarray] = None

    def reset(self) -> None:
        """Forget the tree."""
        self.root = None
        self.history16 = []
        self.raw_prior = None

    def set_root(self, node: Node, history16: list[int], ply: int) -> None:
        """Make ``node`` (``ply`` plies into the game ``history16``) the root; the kept raw
        priors belong to the old root and go unless ``node`` is it."""
        if node is not self.root:
            self.raw_prior = None
        self.root, self.history16, self.ply = node, history16, ply

    def advance(self, move: Union[int, str]) -> bool:
        """Make the child reached by ``move`` (cshogi code or USI) the root, keeping its subtree.

        Returns:
            True when that child was in the tree and expanded (its visits are kept), False when
            the tree was dropped.
        """
        root = self.root
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
        self.set_root(child, self.history16 + [root.moves[idx] & 0xFFFF], self.ply + 1)
        return True

    def find(self, board: cshogi.Board, ply: int, history16: list[int]) -> Optional[Node]:
        """The expanded node of ``board`` (``ply`` plies into the game whose moves are
        ``history16``) in the kept tree, reached from the root through the moves played since
        it, or None: the game must extend the root's (same moves before it, same ply base) and
        each of those moves lead to an expanded, non-terminal child."""
        root = self.root
        if root is None:
            return None
        old = self.history16
        if len(history16) < len(old) or history16[: len(old)] != old:
            return None
        if ply - len(history16) != self.ply - len(old):
            return None
        node = root
        for m in history16[len(old):]:
            child = node.children.get(node.child_index(m))
            if child is None or child.moves is None or child.terminal is not None:
                return None
            node = child
        if node.key != board.zobrist_hash() or node.moves is None:
            return None
        return node


# ------------------------------------------------------------------------------------------------
# limits, counters, results


@dataclass
class SearchLimits:
    """The limits of a running search, read after every simulation, so another thread may change
    them while :meth:`keisei_stream.play.engine.mcts.MCTS.search` runs (USI ``ponderhit``: the
    search started without limits gets its time budget from that moment). Plain attribute writes;
    no lock needed.

    Attributes:
        nodes: simulations of this search call to run, or None (no node limit).
        deadline: ``time.perf_counter()`` value at which the search ends, or None (no time limit).
    """

    nodes: Optional[int] = None
    deadline: Optional[float] = None


class SearchStats:
    """Counters of one search call (see :class:`SearchResult` for their meaning)."""

    __slots__ = ("sims", "evaluations", "terminal_hits", "collisions", "batches", "seldepth", "forward_seconds")

    def __init__(self) -> None:
        self.sims = 0
        self.evaluations = 0
        self.terminal_hits = 0
        self.collisions = 0
        self.batches = 0
        self.seldepth = 0
        self.forward_seconds = 0.0


@dataclass
class SearchResult:
    """Outcome of a search (also passed, partial, to the ``info`` callback).

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
        shortcut: ``""`` after a search, else why the answer came without one: ``"resign"``,
            ``"win"``, ``"mate"`` (the root mate search), ``"one_legal_move"`` (``value`` NaN:
            not searched) or ``"every_move_ends_the_game"`` (``value``: the best exact value).
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
    shortcut: str = ""

    @property
    def ponder_usi(self) -> Optional[str]:
        """The expected reply (``pv[1]``) for USI ``bestmove ... ponder ...``, else None."""
        return self.pv[1] if len(self.pv) > 1 else None


def choose_root_edge(root: Node, temperature: float, rng: np.random.Generator) -> int:
    """The root edge to play: a move that wins at once (the opponent's node is a terminal loss),
    else the most visited (ties: higher Q, then higher prior), or with ``temperature > 0`` a
    sample with probability proportional to ``visits ** (1 / temperature)`` drawn from ``rng``."""
    for idx, child in root.children.items():
        if child.terminal is not None and child.terminal < 0:
            return idx
    visits = np.array(root.n)
    if visits.sum() <= 0:
        return 0
    if temperature > 0:
        p = visits ** (1.0 / temperature)
        p /= p.sum()
        return int(rng.choice(len(p), p=p))
    q = np.divide(np.array(root.w), visits, out=np.full(visits.shape, -2.0), where=visits > 0)
    order = np.lexsort((np.array(root.prior), q, visits))
    return int(order[-1])


def most_visited(node: Node) -> int:
    """Index of the edge of ``node`` with the most visits (the first of equals)."""
    n = node.n
    return max(range(len(n)), key=n.__getitem__)


def principal_variation(root: Node, first: int, max_len: int = 64) -> list[str]:
    """USI moves from ``root``: edge ``first``, then the most visited edge at each level below,
    until an unexpanded or terminal node (at most ``max_len`` moves)."""
    pv = [cshogi.move_to_usi(root.moves[first])]
    node = root.children.get(first)
    while node is not None and node.moves is not None and node.terminal is None and node.n_sum > 0:
        idx = most_visited(node)
        pv.append(cshogi.move_to_usi(node.moves[idx]))
        node = node.children.get(idx)
        if len(pv) >= max_len:
            break
    return pv


def tree_result(root: Node, best: int, stats: SearchStats, t0: float, reused: int) -> SearchResult:
    """The :class:`SearchResult` of a search from ``root`` that plays edge ``best``; ``t0``: its
    ``time.perf_counter()`` start, ``reused``: root visits kept from the previous search."""
    n = np.array(root.n)
    visits = np.rint(n).astype(np.int64)
    q = np.divide(np.array(root.w), n, out=np.full(n.shape, np.nan), where=n > 0).astype(np.float32)
    elapsed = time.perf_counter() - t0
    pv = principal_variation(root, best)
    value = float(q[best]) if visits[best] > 0 else root.value
    root_value = float(root.w_sum / root.n_sum) if root.n_sum > 0 else root.value
    return SearchResult(
        best_move=int(root.moves[best]), best_usi=cshogi.move_to_usi(root.moves[best]),
        moves=list(root.moves), visits=visits, q=q, prior=np.array(root.prior, dtype=np.float32),
        value=value, root_value=root_value, pv=pv, nodes=stats.sims, total_visits=int(visits.sum()),
        evaluations=stats.evaluations, terminal_hits=stats.terminal_hits, collisions=stats.collisions,
        batches=stats.batches, reused_visits=reused, depth=len(pv), seldepth=stats.seldepth,
        elapsed=elapsed, nps=stats.sims / elapsed if elapsed > 0 else 0.0,
        forward_seconds=stats.forward_seconds,
    )
