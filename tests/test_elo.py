"""Elo, confidence interval and LOS against values computed by hand and cutechess's formulas
(as ported in cshogi.elo)."""

import math

import pytest
from cshogi.elo import Elo as CutechessElo

from keisei_stream.play.evaluation import elo


def test_elo_from_score_known_values():
    assert elo.elo_from_score(0.5) == 0.0
    assert elo.elo_from_score(0.75) == pytest.approx(400 * math.log10(3))  # 190.85
    assert elo.elo_from_score(0.9) == pytest.approx(400 * math.log10(9))  # 381.70
    assert elo.elo_from_score(0.25) == pytest.approx(-400 * math.log10(3))
    assert elo.elo_from_score(1.0) == math.inf and elo.elo_from_score(0.0) == -math.inf
    for x in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            elo.elo_from_score(x)
    assert elo.score_from_elo(elo.elo_from_score(0.8)) == pytest.approx(0.8)


def test_estimate_by_hand_60_30_10():
    # s = 0.65; var = (60*.35^2 + 30*.65^2 + 10*.15^2)/100 = 0.2025; se = sqrt(.2025/100) = 0.045
    e = elo.estimate(60, 30, 10)
    assert e.score == pytest.approx(0.65)
    assert elo.score_stderr(60, 30, 10) == pytest.approx(0.045)
    lo_s, hi_s = 0.65 - elo.Z95 * 0.045, 0.65 + elo.Z95 * 0.045
    assert e.elo == pytest.approx(-400 * math.log10(1 / 0.65 - 1))  # 107.54
    assert e.elo_lo == pytest.approx(-400 * math.log10(1 / lo_s - 1))  # 43.2
    assert e.elo_hi == pytest.approx(-400 * math.log10(1 / hi_s - 1))  # 180.1
    assert (round(e.elo, 1), round(e.elo_lo, 1), round(e.elo_hi, 1)) == (107.5, 43.2, 180.1)
    assert e.los == pytest.approx(0.5 * (1 + math.erf(30 / math.sqrt(180))))
    assert e.draw_ratio == pytest.approx(0.1) and not e.bounded


@pytest.mark.parametrize("w,l,d", [(60, 30, 10), (10, 10, 80), (500, 400, 100), (7, 12, 3), (1, 2, 0)])
def test_matches_cutechess(w, l, d):
    ours, ref = elo.estimate(w, l, d), CutechessElo(w, l, d)
    assert ours.elo == pytest.approx(ref.diff(), abs=1e-9)
    assert 100 * ours.los == pytest.approx(ref.los(), abs=1e-9)
    if math.isfinite(ours.elo_margin):
        # cutechess inverts erf with Winitzki's approximation; ours uses the exact quantile
        assert ours.elo_margin == pytest.approx(ref.error_margin(), rel=5e-3)


def test_los_values():
    assert elo.los(5, 5) == 0.5
    assert elo.los(0, 0) == 0.5
    assert elo.los(10, 0) == pytest.approx(0.5 * (1 + math.erf(10 / math.sqrt(20))))  # 0.99922
    assert elo.los(0, 10) == pytest.approx(1 - elo.los(10, 0))
    with pytest.raises(ValueError):
        elo.los(-1, 2)


def test_all_wins_and_all_losses_are_bounded():
    e = elo.estimate(10, 0, 0)
    assert e.bounded and e.score == 1.0
    assert e.elo == pytest.approx(elo.elo_from_score(9.5 / 10))
    assert e.elo_lo == pytest.approx(elo.elo_from_score(0.025 ** (1 / 10)))  # Clopper-Pearson, ~140
    assert e.elo_hi == math.inf
    d = e.to_dict()
    assert d["elo_hi"] is None and d["elo_margin"] is None and d["elo_lo"] == pytest.approx(e.elo_lo)
    e = elo.estimate(0, 4, 0)
    assert e.elo_lo == -math.inf and e.elo_hi == pytest.approx(-elo.elo_from_score(0.025 ** 0.25))
    assert e.elo < 0


def test_only_draws_and_bad_counts():
    e = elo.estimate(0, 0, 10)
    assert e.elo == 0.0 and e.elo_lo == 0.0 and e.elo_hi == 0.0 and e.los == 0.5
    with pytest.raises(ValueError):
        elo.estimate(0, 0, 0)
    with pytest.raises(ValueError):
        elo.estimate(-1, 3, 0)


def test_combine_inverse_variance():
    m, lo, hi = elo.combine([(100.0, 60.0, 140.0), (100.0, 60.0, 140.0)])
    assert m == pytest.approx(100.0)
    assert (hi - lo) == pytest.approx(80.0 / math.sqrt(2))
    m, _, _ = elo.combine([(0.0, -10.0, 10.0), (100.0, 0.0, 200.0)])  # the tighter one dominates
    assert 0 < m < 5
    m, lo, hi = elo.combine([(300.0, 200.0, math.inf)])
    assert m == pytest.approx(300.0) and lo == pytest.approx(200.0)
    with pytest.raises(ValueError):
        elo.combine([])


def test_summary_line():
    line = elo.format_summary("a", "b", elo.estimate(60, 30, 10))
    assert line.startswith("a vs b: 60-30-10 (score 65.0%), Elo +107.5 [+43.2, +180.1]")
    assert "LOS 99.9%" in line
