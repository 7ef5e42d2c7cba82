"""Advantages for two-player zero-sum self-play: GAE with the per-ply sign flip over game
segments, and the staleness filter.

Source: GAE, Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation", arXiv:1506.02438 (eqs. 11-16), in negamax form: every
value is from the side to move's view, so the next position's value enters with a minus sign.
Workers send games in segments (:mod:`keisei_stream.experience.schema`); :func:`segment_advantages`
joins the consecutive segments of one game that an update holds (so a game whose segments are all
there gets exactly the advantages of the whole game) and bootstraps at a cut whose continuation is
not there, as IMPALA and Sample Factory do at a rollout's end (Espeholt et al. 2018,
arXiv:1802.01561, sec. 4), from the cut's bootstrap value *and* its bootstrap advantage: the GAE
advantage of the position after the cut, which the worker computed over the plies it played after
the cut before it sent the segment. The advantages are then the whole game's GAE truncated at the
end of the worker's look-ahead instead of at the cut (given the whole game's advantage there, they
are exactly the whole game's).
"""

from __future__ import annotations

from dataclasses import dataclass

import cshogi
import numpy as np

from keisei_stream.shogi import action_to_move
from keisei_stream.experience import ExperienceBatch


def compute_gae(
    values: np.ndarray,
    offsets: np.ndarray,
    final_rewards: np.ndarray,
    gamma: float,
    lam: float,
    bootstrap: np.ndarray | None = None,
    bootstrap_advantage: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over runs of consecutive self-play positions with the zero-sum sign flip between plies.

    Positions ``t = 0..T-1`` of one run alternate movers and every value is from the mover's
    point of view, so the opponent's value enters with a minus sign (negamax form of GAE,
    Schulman et al. 2016, arXiv:1506.02438):

    * ``delta_t = r_t - gamma * V_{t+1} - V_t`` for ``t < T-1`` (``r_t = 0`` there),
    * ``delta_{T-1} = r_final - gamma * B - V_{T-1}``: a run that ended its game has ``B = 0`` (no
      bootstrap past the end of a game); a run cut before the end bootstraps from ``B``, the value
      of the position after its last move from the side to move there, and ``r_final = 0``,
    * ``A_t = delta_t - gamma * lam * A_{t+1}``, ``A_{T-1} = delta_{T-1} - gamma * lam * A_B``,
      where ``A_B`` is the advantage of the position after the cut (same view as ``B``; 0 when
      unknown or when the game ended): with the true ``A_B`` this is the GAE of the uncut game,
    * ``returns = A + V``.

    A game cut at ``max_plies`` is a draw: its final reward is 0 and nothing is bootstrapped.
    Runs never bootstrap into each other. The recursion is a backward scan over "plies from the
    end" run for all runs at once (one vectorised step per ply of the longest run).

    Args:
        values: ``(P,)`` float values ``V_t``, run after run.
        offsets: ``(G+1,)`` int, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == P``; run
            ``g`` holds positions ``offsets[g]:offsets[g+1]``.
        final_rewards: ``(G,)`` float, reward of the last mover of each run (+1 won, -1 lost,
            0 draw / max plies / cut).
        gamma: discount per ply, in (0, 1].
        lam: GAE lambda, in [0, 1].
        bootstrap: ``(G,)`` float ``B`` of each run (0 for runs that ended their game); None: all 0.
        bootstrap_advantage: ``(G,)`` float ``A_B`` of each run; None: all 0.

    Returns:
        ``(advantages (P,) float32, returns (P,) float32)``, each from its position's mover's view.

    Raises:
        ValueError: inconsistent shapes or offsets.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    plan = scan_plan(offsets, final_rewards, gamma, lam, bootstrap, bootstrap_advantage, num_positions=v.shape[0])
    adv = scan_advantages(v, plan.last, plan.tail, plan.by_level, plan.bounds, gamma, lam)
    return adv.astype(np.float32), (adv + v).astype(np.float32)


@dataclass
class ScanPlan:
    """What :func:`compute_gae`'s backward scan needs besides the values, known before them (the
    learner builds it on the host while the device computes the values).

    Attributes:
        last: ``(P,) float64``, 1.0 at the last position of each run, else 0.0.
        tail: ``(P,) float64``, ``r_final - gamma * B - gamma * lam * A_B`` of each position's run
            (what ``delta`` is at a run's last position, plus ``V``).
        by_level: ``(P,) int64`` the positions sorted by plies from their run's end (stable).
        bounds: level ``k`` (``k`` plies from the end) holds ``by_level[bounds[k]:bounds[k+1]]``.
    """

    last: np.ndarray
    tail: np.ndarray
    by_level: np.ndarray
    bounds: list[int]


def scan_plan(offsets: np.ndarray, final_rewards: np.ndarray, gamma: float, lam: float,
              bootstrap: np.ndarray | None, bootstrap_advantage: np.ndarray | None, num_positions: int) -> ScanPlan:
    """The :class:`ScanPlan` of runs ``offsets`` (arguments as :func:`compute_gae`).

    Raises:
        ValueError: inconsistent shapes or offsets.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1)
    fr = np.asarray(final_rewards, dtype=np.float64).reshape(-1)
    p = int(num_positions)
    if off.shape[0] < 1 or off[0] != 0 or off[-1] != p or np.any(np.diff(off) < 0):
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at {p}")
    if fr.shape[0] != off.shape[0] - 1:
        raise ValueError(f"final_rewards has {fr.shape[0]} runs, offsets describe {off.shape[0] - 1}")
    boot, boot_adv = (np.zeros_like(fr) if x is None else np.asarray(x, dtype=np.float64).reshape(-1)
                      for x in (bootstrap, bootstrap_advantage))
    if boot.shape != fr.shape or boot_adv.shape != fr.shape:
        raise ValueError(f"bootstrap has {boot.shape[0]} runs, bootstrap_advantage {boot_adv.shape[0]}, "
                         f"offsets describe {fr.shape[0]}")
    lengths = np.diff(off)
    game = np.repeat(np.arange(lengths.shape[0]), lengths)  # (P,) run of each position
    from_end = off[1:][game] - 1 - np.arange(p)  # (P,) 0 for the last position of its run
    # at a run's last position A_{T-1} = delta_{T-1} - gamma * lam * A_B: the scan's start
    tail = (fr - gamma * boot - gamma * lam * boot_adv)[game]
    counts = np.bincount(from_end) if p else np.zeros(0, np.int64)
    return ScanPlan(last=(from_end == 0).astype(np.float64), tail=tail.astype(np.float64),
                    by_level=np.argsort(from_end, kind="stable").astype(np.int64),
                    bounds=[0, *np.cumsum(counts).tolist()])


def scan_advantages(v, last, tail, by_level, bounds: list[int], gamma: float, lam: float):
    """GAE advantages of values ``v`` (``(P,)`` float64, run after run) by :class:`ScanPlan`'s
    backward scan: ``delta_t = -gamma V_{t+1} - V_t`` inside a run, ``tail - V_t`` at its end;
    ``A_t = delta_t - gamma lam A_{t+1}``, one vectorised step per ply of the longest run.

    The same code for NumPy arrays (:func:`compute_gae`) and for tensors on a device (the
    learner's update, no host synchronisation: the levels' bounds are host integers), with
    ``last``, ``tail``, ``by_level`` of the same kind as ``v``.

    Returns:
        ``(P,)`` float64 advantages, the kind of ``v``.
    """
    adv = v * 0.0
    if not len(bounds) > 1:
        return adv
    v_next = v * 0.0
    v_next[:-1] = v[1:]
    delta = last * (tail - v) + (1.0 - last) * (-gamma * v_next - v)
    idx = by_level[bounds[0]:bounds[1]]
    adv[idx] = delta[idx]
    coef = gamma * lam
    for k in range(1, len(bounds) - 1):  # positions k plies from the end depend on those k - 1 from it
        idx = by_level[bounds[k]:bounds[k + 1]]
        adv[idx] = delta[idx] - coef * adv[idx + 1]
    return adv


def filter_stale(versions: np.ndarray, current_version: int, max_policy_lag: int) -> np.ndarray:
    """Which positions are fresh enough to train on.

    Args:
        versions: ``(P,)`` int model version that chose each position's move.
        current_version: the learner's current (latest published) version.
        max_policy_lag: keep positions with ``current_version - version <= max_policy_lag``.

    Returns:
        ``(P,)`` bool keep-mask. Versions newer than ``current_version`` (negative lag) are kept.
    """
    lag = int(current_version) - np.asarray(versions, dtype=np.int64)
    return lag <= int(max_policy_lag)


@dataclass
class Chains:
    """The segments of a batch joined into runs of consecutive positions of one game.

    Attributes:
        order: ``(P,) int64``: the batch's positions, run after run (a permutation).
        offsets: ``(C+1,) int64`` run boundaries in ``order``.
        final_rewards: ``(C,) float32`` reward of each run's last mover (0 for a cut run).
        bootstrap: ``(C,) float32`` each run's bootstrap value (0 when its game ended in it).
        bootstrap_advantage: ``(C,) float32`` each run's bootstrap advantage (likewise).
        joins: segments joined to their predecessor.
    """

    order: np.ndarray
    offsets: np.ndarray
    final_rewards: np.ndarray
    bootstrap: np.ndarray
    bootstrap_advantage: np.ndarray
    joins: int


def position_after(hcp: np.ndarray, action: int) -> np.ndarray:
    """``(32,) uint8``: the HCP of the position after ``action`` is played in ``hcp``.

    Raises:
        ValueError: the action is not legal there.
    """
    board = cshogi.Board()
    board.set_hcp(np.ascontiguousarray(hcp, dtype=np.uint8))
    board.push(action_to_move(board, int(action)))
    out = np.empty(32, np.uint8)
    board.to_hcp(out)
    return out


def chain_segments(b: ExperienceBatch) -> Chains:
    """Join the consecutive segments of one game held in ``b`` into runs.

    Segment ``t`` continues a cut segment ``s`` when both carry the same ``game`` number, ``t``
    starts at the ply after ``s``'s last, and ``t``'s first position is ``s``'s last position
    after its action (checked with cshogi, so a wrong ``game`` number joins nothing). Every
    segment is in exactly one run; a run ends where its game ended or where its continuation is
    not in the batch.
    """
    off = b.segment_offsets.astype(np.int64)
    s_count = b.num_segments
    first_ply = b.ply[off[:-1]].astype(np.int64)
    last = off[1:] - 1
    starts = {}
    for t in range(s_count):
        starts.setdefault((int(b.game[t]), int(first_ply[t])), t)
    succ = np.full(s_count, -1, np.int64)
    has_pred = np.zeros(s_count, bool)
    for s in np.flatnonzero(~b.ended):
        t = starts.get((int(b.game[s]), int(b.ply[last[s]]) + 1))
        if t is None or has_pred[t] or t == s:
            continue
        try:
            joined = np.array_equal(position_after(b.hcp[last[s]], b.action[last[s]]), b.hcp[off[t]])
        except ValueError:  # an illegal action: replay validation lets none through
            joined = False
        if joined:
            succ[s], has_pred[t] = t, True
    order, run_lengths, tails = [], [], []
    for head in np.flatnonzero(~has_pred):
        s, n = int(head), 0
        while s >= 0:
            order.append(np.arange(off[s], off[s + 1]))
            n += int(off[s + 1] - off[s])
            tails_s, s = s, int(succ[s])
        run_lengths.append(n)
        tails.append(tails_s)
    tails_a = np.array(tails, np.int64)
    return Chains(order=np.concatenate(order) if order else np.zeros(0, np.int64),
                  offsets=np.concatenate([[0], np.cumsum(run_lengths, dtype=np.int64)]).astype(np.int64),
                  final_rewards=b.final_rewards()[tails_a], bootstrap=b.bootstrap.astype(np.float32)[tails_a],
                  bootstrap_advantage=b.bootstrap_advantage.astype(np.float32)[tails_a], joins=int(has_pred.sum()))


def segment_plan(b: ExperienceBatch, gamma: float, lam: float) -> tuple[Chains, ScanPlan]:
    """:func:`chain_segments` of ``b`` and the :class:`ScanPlan` of its runs: everything of
    :func:`segment_advantages` that does not need the values (host work, cshogi)."""
    c = chain_segments(b)
    return c, scan_plan(c.offsets, c.final_rewards, gamma, lam, c.bootstrap, c.bootstrap_advantage, len(c.order))


def segment_advantages(b: ExperienceBatch, values: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray, int]:
    """GAE (:func:`compute_gae`) over the runs :func:`chain_segments` makes of ``b``'s segments.

    Args:
        b: the update's batch. values: ``(P,)`` float values of its positions (the workers' or
            the proximal pass's). gamma, lam: as :func:`compute_gae`.

    Returns:
        ``(advantages (P,) float32, returns (P,) float32, joins)`` in the batch's position order;
        ``joins``: segments joined to their predecessor.
    """
    c, plan = segment_plan(b, gamma, lam)
    v = np.asarray(values, dtype=np.float64)[c.order]
    a = scan_advantages(v, plan.last, plan.tail, plan.by_level, plan.bounds, gamma, lam)
    adv, ret = np.empty(b.num_positions, np.float32), np.empty(b.num_positions, np.float32)
    adv[c.order], ret[c.order] = a, a + v
    return adv, ret, c.joins
