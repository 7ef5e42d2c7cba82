"""Advantages for two-player zero-sum self-play: GAE with the per-ply sign flip, and the
staleness filter.

Source: GAE, Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation", arXiv:1506.02438 (eqs. 11-16), in negamax form: every
value is from the side to move's view, so the next position's value enters with a minus sign.
"""

from __future__ import annotations

import numpy as np


def compute_gae(
    values: np.ndarray,
    game_offsets: np.ndarray,
    final_rewards: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over whole self-play games with the zero-sum sign flip between plies.

    Positions ``t = 0..T-1`` of one game alternate movers and every value is from the mover's
    point of view, so the opponent's value enters with a minus sign (negamax form of GAE,
    Schulman et al. 2016, arXiv:1506.02438):

    * ``delta_t = r_t - gamma * V_{t+1} - V_t`` for ``t < T-1`` (``r_t = 0`` there),
    * ``delta_{T-1} = r_final - V_{T-1}`` (no bootstrap past the end of a game),
    * ``A_t = delta_t - gamma * lam * A_{t+1}``, ``A_{T-1} = delta_{T-1}``,
    * ``returns = A + V``.

    A game cut at ``max_plies`` is a draw: its final reward is 0 and nothing is bootstrapped.
    Games never bootstrap into each other. The recursion is a backward scan over "plies from the
    end" run for all games at once (one vectorised step per ply of the longest game).

    Args:
        values: ``(P,)`` float behaviour values ``V_t`` in game order.
        game_offsets: ``(G+1,)`` int, ``game_offsets[0] == 0``, non-decreasing,
            ``game_offsets[-1] == P``; game ``g`` holds positions ``offsets[g]:offsets[g+1]``.
        final_rewards: ``(G,)`` float, reward of the last mover of each game (+1 won, -1 lost,
            0 draw / max plies).
        gamma: discount per ply, in (0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        ``(advantages (P,) float32, returns (P,) float32)``, each from its position's mover's view.

    Raises:
        ValueError: inconsistent shapes or offsets.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    off = np.asarray(game_offsets, dtype=np.int64).reshape(-1)
    fr = np.asarray(final_rewards, dtype=np.float64).reshape(-1)
    p = v.shape[0]
    if off.shape[0] < 1 or off[0] != 0 or off[-1] != p or np.any(np.diff(off) < 0):
        raise ValueError(f"game_offsets must start at 0, be non-decreasing and end at {p}")
    if fr.shape[0] != off.shape[0] - 1:
        raise ValueError(f"final_rewards has {fr.shape[0]} games, offsets describe {off.shape[0] - 1}")
    if p == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    lengths = np.diff(off)
    game = np.repeat(np.arange(lengths.shape[0]), lengths)  # (P,) game of each position
    from_end = off[1:][game] - 1 - np.arange(p)  # (P,) 0 for the last position of its game
    last = from_end == 0
    v_next = np.zeros(p)
    v_next[:-1] = v[1:]
    delta = np.where(last, fr[game] - v, -gamma * v_next - v)
    # Backward scan: positions with from_end == k depend on their successor (from_end == k - 1).
    adv = np.empty(p)
    order = np.argsort(from_end, kind="stable")
    counts = np.bincount(from_end)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    idx = order[bounds[0]:bounds[1]]
    adv[idx] = delta[idx]
    coef = gamma * lam
    for k in range(1, counts.shape[0]):
        idx = order[bounds[k]:bounds[k + 1]]
        adv[idx] = delta[idx] - coef * adv[idx + 1]
    return adv.astype(np.float32), (adv + v).astype(np.float32)


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
