"""Elo arithmetic of a match result: pure math, no I/O.

A match of ``N = W + L + D`` games gives the score ``s = (W + D/2) / N`` (a draw counts half).

- **Elo difference** (logistic model, base 10, scale 400; Elo 1978, as used by cutechess-cli and
  fishtest): ``elo(s) = -400 * log10(1/s - 1)``.
- **95 % confidence interval**: normal approximation of the mean per-game score. The per-game
  variance with draws is ``var = [W (1-s)^2 + L (0-s)^2 + D (1/2-s)^2] / N`` and the standard
  error of ``s`` is ``sqrt(var / N)``; the score interval ``s +- 1.959964 * se`` is mapped through
  ``elo()``; the "+-" margin is half its Elo width. This is cutechess-cli's ``Elo`` class
  (``src/elo.cpp``: ``diff()``, ``errorMargin()``), ported as ``cshogi.elo``, and fishtest's
  "trinomial" interval. The Elo interval is asymmetric (``elo_lo``, ``elo_hi``).
- **Likelihood of superiority** (draws carry no information; normal approximation of the
  binomial W vs L): ``LOS = 1/2 * (1 + erf((W - L) / sqrt(2 (W + L))))`` (cutechess ``los()``,
  the chessprogramming wiki's "Match Statistics").

Edge cases (not covered by the normal approximation, documented choices):

- ``s == 1`` (every game won) or ``s == 0``: ``elo(s)`` is infinite. The point estimate then uses
  the score shrunk by half a game, ``(N - 1/2)/N`` or ``(1/2)/N`` (``bounded=True`` in the result),
  the far bound is infinite and the near bound is the exact two-sided 95 % Clopper-Pearson
  bound for an all-win (all-loss) record: ``p_lo = 0.025 ** (1/N)`` (``1 - p_lo`` for all losses).
- ``W + L == 0``: ``LOS = 0.5``.
- ``N == 0``: :class:`ValueError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: two-sided 95 % quantile of the standard normal distribution (Phi^-1(0.975)).
Z95 = 1.959963984540054


def elo_from_score(score: float) -> float:
    """Elo difference for an expected score (logistic model, base 10, scale 400).

    Args:
        score: expected score in [0, 1] (wins + draws/2 per game).

    Returns:
        ``-400 * log10(1/score - 1)`` in Elo points; ``+inf`` for 1, ``-inf`` for 0.

    Raises:
        ValueError: if ``score`` is outside [0, 1] or NaN.
    """
    if not (0.0 <= score <= 1.0):
        raise ValueError(f"score must be in [0, 1], got {score!r}")
    if score == 1.0:
        return math.inf
    if score == 0.0:
        return -math.inf
    return -400.0 * math.log10(1.0 / score - 1.0) + 0.0  # + 0.0: no negative zero


def score_from_elo(elo: float) -> float:
    """Expected score of a player ``elo`` points stronger: ``1 / (1 + 10^(-elo/400))``."""
    return 1.0 / (1.0 + 10.0 ** (-elo / 400.0))


def score_stderr(wins: int, losses: int, draws: int) -> float:
    """Standard error of the mean per-game score with draws (trinomial normal approximation).

    ``sqrt([W (1-s)^2 + L s^2 + D (1/2 - s)^2] / N / N)`` (cutechess ``Elo`` constructor).

    Raises:
        ValueError: if a count is negative or there are no games.
    """
    n = _check_counts(wins, losses, draws)
    s = (wins + 0.5 * draws) / n
    var = (wins * (1.0 - s) ** 2 + losses * s ** 2 + draws * (0.5 - s) ** 2) / n
    return math.sqrt(var / n)


def los(wins: int, losses: int) -> float:
    """Likelihood of superiority in [0, 1]: ``0.5 * (1 + erf((W - L) / sqrt(2 (W + L))))``.

    Returns 0.5 when ``W + L == 0`` (only draws, or no games).

    Raises:
        ValueError: if a count is negative.
    """
    if wins < 0 or losses < 0:
        raise ValueError("counts must be >= 0")
    if wins + losses == 0:
        return 0.5
    return 0.5 * (1.0 + math.erf((wins - losses) / math.sqrt(2.0 * (wins + losses))))


@dataclass(frozen=True)
class EloEstimate:
    """Elo of player A relative to player B from A's wins/losses/draws.

    Fields: ``games``, ``wins``, ``losses``, ``draws``; ``score`` in [0, 1]; ``elo`` (point
    estimate, Elo points, finite); ``elo_lo`` / ``elo_hi`` (95 % interval; may be -inf/+inf at
    a 0 % / 100 % score); ``elo_margin`` (half the interval's width, cutechess's "+-"; inf when a
    bound is infinite); ``los`` in [0, 1]; ``draw_ratio``; ``bounded`` (True when the score was
    0 or 1 and the point estimate uses the half-game correction).
    """

    games: int
    wins: int
    losses: int
    draws: int
    score: float
    elo: float
    elo_lo: float
    elo_hi: float
    elo_margin: float
    los: float
    draw_ratio: float
    bounded: bool

    def to_dict(self) -> dict:
        """Plain dict with infinite values written as ``None`` (valid JSON)."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def _check_counts(wins: int, losses: int, draws: int) -> int:
    if min(wins, losses, draws) < 0:
        raise ValueError(f"counts must be >= 0, got W={wins} L={losses} D={draws}")
    n = wins + losses + draws
    if n == 0:
        raise ValueError("no games")
    return n


def estimate(wins: int, losses: int, draws: int, z: float = Z95) -> EloEstimate:
    """Elo difference, its confidence interval and LOS for a W/L/D record.

    Args:
        wins, losses, draws: game counts of player A against player B (>= 0, sum > 0).
        z: normal quantile of the two-sided interval (1.96 = 95 %).

    Returns:
        :class:`EloEstimate` (see the module docstring for formulas and edge cases).

    Raises:
        ValueError: negative counts or no games.

    Example, 60-30-10 by hand: s = 0.65, var = 0.2025, se = 0.045, score interval
    [0.5618, 0.7382] -> Elo [+43.2, +180.1] (cutechess/cshogi.elo print 107.5 +/- 68.4; their
    inverse erf is an approximation, see tests):

    >>> e = estimate(60, 30, 10)
    >>> round(e.elo, 1), round(e.elo_lo, 1), round(e.elo_hi, 1), round(e.los, 4)
    (107.5, 43.2, 180.1, 0.9992)
    """
    n = _check_counts(wins, losses, draws)
    s = (wins + 0.5 * draws) / n
    bounded = s in (0.0, 1.0)
    if not bounded:
        se = score_stderr(wins, losses, draws)
        lo_s = min(max(s - z * se, 0.0), 1.0)
        hi_s = min(max(s + z * se, 0.0), 1.0)
        elo = elo_from_score(s)
        elo_lo, elo_hi = elo_from_score(lo_s), elo_from_score(hi_s)
    else:
        # all wins (or all losses): exact Clopper-Pearson bound, half-game shrunk point estimate
        alpha_half = 0.5 * math.erfc(z / math.sqrt(2.0))  # 0.025 for z = 1.96
        p_near = alpha_half ** (1.0 / n)
        if s == 1.0:
            elo = elo_from_score((n - 0.5) / n)
            elo_lo, elo_hi = elo_from_score(p_near), math.inf
        else:
            elo = elo_from_score(0.5 / n)
            elo_lo, elo_hi = -math.inf, elo_from_score(1.0 - p_near)
    margin = (elo_hi - elo_lo) / 2.0
    return EloEstimate(
        games=n, wins=wins, losses=losses, draws=draws, score=s, elo=elo, elo_lo=elo_lo,
        elo_hi=elo_hi, elo_margin=margin, los=los(wins, losses), draw_ratio=draws / n,
        bounded=bounded,
    )


def combine(estimates: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Inverse-variance weighted mean of independent Elo estimates ``(elo, lo, hi)``.

    Each estimate's standard deviation is taken as ``(hi - lo) / (2 * 1.96)``, or from its finite
    side when one bound is infinite. Used to merge a version's ratings against several anchored
    opponents into one number.

    Returns:
        ``(elo, lo, hi)`` of the combined estimate (95 %).

    Raises:
        ValueError: on an empty list.
    """
    if not estimates:
        raise ValueError("no estimates")
    num = den = 0.0
    for elo, lo, hi in estimates:
        if math.isfinite(lo) and math.isfinite(hi):
            sd = (hi - lo) / (2.0 * Z95)
        elif math.isfinite(lo):
            sd = (elo - lo) / Z95
        elif math.isfinite(hi):
            sd = (hi - elo) / Z95
        else:
            sd = 1e6
        sd = max(sd, 1e-6)
        w = 1.0 / (sd * sd)
        num += w * elo
        den += w
    mean = num / den
    sd = math.sqrt(1.0 / den)
    return mean, mean - Z95 * sd, mean + Z95 * sd


def format_summary(name_a: str, name_b: str, e: EloEstimate) -> str:
    """One line: ``A vs B: W-L-D (score 62.5%), Elo +88.7 [+21.3, +160.1] (+-69.4), LOS 99.6%``."""
    def f(x: float) -> str:
        return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:+.1f}"

    approx = "~" if e.bounded else ""
    return (f"{name_a} vs {name_b}: {e.wins}-{e.losses}-{e.draws} (score {100 * e.score:.1f}%), "
            f"Elo {approx}{f(e.elo)} [{f(e.elo_lo)}, {f(e.elo_hi)}] (+-{e.elo_margin:.1f}), "
            f"LOS {100 * e.los:.1f}%")
