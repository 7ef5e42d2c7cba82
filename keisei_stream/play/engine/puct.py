"""One simulation's arithmetic: the PUCT choice of an edge, virtual losses and the backup of a
value along the path, root noise; and the options that tune them (:class:`SearchOptions`). The
values and edges are those of :mod:`keisei_stream.play.engine.tree`.

PUCT score (dlshogi's ``select_max_ucb_child``, the AlphaZero rule with a visit-dependent c)
    ``score(a) = Q(s, a) + c(s) * P(s, a) * sqrt(N(s)) / (1 + N(s, a))`` with
    ``N(s) = sum_b N(s, b)`` and ``c(s) = c_init + log((N(s) + c_base + 1) / c_base)``
    (AlphaZero pseudocode: ``c_init = 1.25, c_base = 19652``; dlshogi's USI defaults:
    ``C_init 1.44, C_base 28288`` and at the root ``C_init_root 1.16, C_base_root 25617``).
    **Those constants are for values in [0, 1]**; here values are in [-1, 1], twice the range, so
    the same search behaviour needs twice the exploration constant (``argmax(Q' + c' U)`` with
    ``Q' = 2Q - 1`` equals ``argmax(Q + c'/2 U)``). The defaults are dlshogi's, doubled:
    ``c_init = 2.88``, ``c_init_root = 2.32``; ``c_base`` (a visit count) is unchanged.
    When ``N(s) = 0`` every score is ``Q`` and the first visit goes to the largest prior.

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

Dirichlet noise (AlphaZero)
    At every search from a root, ``P := (1 - eps) P + eps Dir(alpha)`` over the root's edges
    (fresh noise each time, the network's priors kept aside), edges re-sorted by the noisy prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from keisei_stream.play.engine.tree import Node

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


@dataclass(slots=True)
class SearchOptions:
    """How :class:`MCTS` searches and chooses (read at every search; may be changed between them).

    Attributes:
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

    Raises:
        ValueError: a value out of its range.
    """

    c_init: float = C_INIT
    c_base: float = C_BASE
    c_init_root: float = C_INIT_ROOT
    c_base_root: float = C_BASE_ROOT
    fpu_reduction: float = FPU_REDUCTION
    fpu_reduction_root: float = FPU_REDUCTION_ROOT
    virtual_loss: float = VIRTUAL_LOSS
    policy_temperature: float = 1.0
    mate_search_plies: int = 1
    leaf_mate_in_1: bool = True
    dirichlet_alpha: Optional[float] = None
    dirichlet_epsilon: float = DIRICHLET_EPSILON
    temperature: float = 0.0
    reuse_tree: bool = True
    max_tree_visits: int = 1_000_000

    def __post_init__(self) -> None:
        checks = (
            ("virtual_loss", self.virtual_loss >= 0, ">= 0"),
            ("policy_temperature", self.policy_temperature > 0, "> 0"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("mate_search_plies", self.mate_search_plies >= 0, ">= 0"),
            ("dirichlet_alpha", self.dirichlet_alpha is None or self.dirichlet_alpha > 0, "> 0 or None"),
            ("c_base", self.c_base > 0, "> 0"),
            ("c_base_root", self.c_base_root > 0, "> 0"),
            ("max_tree_visits", int(self.max_tree_visits) == self.max_tree_visits and self.max_tree_visits >= 1,
             "an integer >= 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


def select(node: Node, is_root: bool, o: SearchOptions) -> int:
    """Edge index of ``node`` with the largest PUCT score (module docstring), virtual losses
    included, with the root's or the other nodes' constants of ``o``.

    Scans the prefix ``[0, node.width)`` (edges sorted by prior; see the "Tree storage" of
    :mod:`keisei_stream.play.engine.tree`) in a Python loop. Ties go to the lowest index.
    """
    total = node.n_sum
    if total <= 0.0:
        return 0
    if is_root:
        c = o.c_init_root + math.log((total + o.c_base_root + 1.0) / o.c_base_root)
        red = o.fpu_reduction_root
    else:
        c = o.c_init + math.log((total + o.c_base + 1.0) / o.c_base)
        red = o.fpu_reduction
    fpu = node.w_sum / total - red * math.sqrt(node.visited_p)
    if fpu < -1.0:
        fpu = -1.0
    k = c * math.sqrt(total)
    n, w, p = node.n, node.w, node.prior
    best = -math.inf
    bi = 0
    for i in range(node.width):
        ni = n[i]
        if ni > 0.0:
            sc = w[i] / ni + k * p[i] / (1.0 + ni)
        else:
            sc = fpu + k * p[i]
        if sc > best:
            best = sc
            bi = i
    return bi


def backup(path: list, leaf_value: float, vl: float) -> None:
    """Add ``leaf_value`` (side to move at the leaf) along ``path`` (``(node, edge index)`` pairs
    from the root), removing the ``vl`` virtual losses each edge carries."""
    v = -leaf_value
    for node, idx in reversed(path):
        node.n[idx] += 1.0 - vl
        node.w[idx] += v + vl
        node.n_sum += 1.0 - vl
        node.w_sum += v + vl
        v = -v


def undo(path: list, vl: float) -> None:
    """Remove the ``vl`` virtual losses of a collided simulation's ``path``."""
    for node, idx in path:
        node.n[idx] -= vl
        node.w[idx] += vl
        node.n_sum -= vl
        node.w_sum += vl


def add_root_noise(root: Node, raw_prior: Optional[np.ndarray], alpha: float, eps: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Root priors := ``(1 - eps) * raw_prior + eps * Dirichlet(alpha)`` (module docstring), edges
    re-sorted by the noisy prior.

    Args:
        root: an expanded node (its ``prior`` is replaced).
        raw_prior: ``(K,) float64`` the network's priors in the root's current edge order, or None
            for the root's own (no noise added yet).

    Returns:
        the network's priors ``(K,) float64`` in the new edge order (the next call's ``raw_prior``).
    """
    raw = np.array(root.prior, dtype=np.float64) if raw_prior is None else raw_prior
    noisy = (1.0 - eps) * raw + eps * rng.dirichlet(np.full(len(raw), alpha))
    perm = np.argsort(-noisy, kind="stable")
    root.prior = noisy.tolist()
    root.reorder(perm.tolist())
    return raw[perm]
