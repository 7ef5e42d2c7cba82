"""GAE over game segments: a game sent in segments gets the advantages and returns of the same game
sent whole (given the same values) when the update holds all its segments, and a cut whose
continuation is missing bootstraps from its value with the zero-sum sign."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from keisei_stream.rl.gae import chain_segments, compute_gae, segment_advantages
from keisei_stream.experience import COLUMNS, POSITION, SEGMENT, ExperienceBatch, concat_batches

G, L = 0.9, 0.8


def _split(b: ExperienceBatch, every: int, values: np.ndarray, boot_adv: np.ndarray | None = None) -> list[ExperienceBatch]:
    """``b``'s games (whole) cut every ``every`` plies as a worker cuts them: one batch per segment,
    a cut segment's bootstrap the value of the next position (the segment after it), and its
    bootstrap advantage ``boot_adv`` of that position (0 when None)."""
    out = []
    off = b.segment_offsets.astype(int)
    for g in range(b.num_segments):
        for s in range(off[g], off[g + 1], every):
            e = min(s + every, off[g + 1])
            ended = e == off[g + 1]
            out.append(ExperienceBatch(
                "x", "w0", **{n: getattr(b, n)[s:e].copy() for n in POSITION.names},
                segment_offsets=np.array([0, e - s], np.uint32),
                result=np.array([b.result[g] if ended else 0], np.int8),
                reason=np.array([b.reason[g] if ended else 0], np.uint8),
                bootstrap=np.array([0.0 if ended else values[e]], np.float32),
                bootstrap_advantage=np.array([0.0 if ended or boot_adv is None else boot_adv[e]], np.float32),
                game=np.array([b.game[g]], np.uint64)))
    return out


@pytest.mark.parametrize("every", [1, 5, 32])
def test_a_game_sent_in_segments_gets_the_advantages_of_the_whole_game(make_batch, every):
    whole = make_batch(600, max_plies=64, seed=31, num_games=6)
    values = np.random.default_rng(0).uniform(-1, 1, whole.num_positions).astype(np.float32)
    whole.value = values
    adv_w, ret_w = compute_gae(values, whole.segment_offsets.astype(np.int64), whole.final_rewards(), G, L)
    parts = _split(whole, every, values)
    order = np.random.default_rng(1).permutation(len(parts))  # segments arrive in any order, in any entries
    shuffled = concat_batches([parts[i] for i in order])
    adv_s, ret_s, joins = segment_advantages(shuffled, shuffled.value, G, L)
    assert joins == len(parts) - whole.num_segments
    position_of = np.concatenate([np.arange(p.num_positions) + sum(q.num_positions for q in parts[:i])
                                  for i, p in enumerate(parts)])  # parts' positions in whole-game order
    back = np.empty_like(position_of)
    back[np.concatenate([position_of[sum(q.num_positions for q in parts[:i]):][:parts[i].num_positions]
                         for i in order])] = np.arange(len(position_of))
    np.testing.assert_allclose(adv_s[back], adv_w, atol=1e-5)
    np.testing.assert_allclose(ret_s[back], ret_w, atol=1e-5)


def test_with_the_look_ahead_advantage_a_lone_segment_gets_the_whole_game_advantages(make_batch):
    """No continuation in the update, but each cut carries the advantage of the position after it
    (what the worker computes over its look-ahead; here over the rest of the game): the segments'
    advantages equal the whole game's, without any join."""
    whole = make_batch(400, max_plies=64, seed=33, num_games=5)
    values = np.random.default_rng(2).uniform(-1, 1, whole.num_positions).astype(np.float32)
    adv_w, ret_w = compute_gae(values, whole.segment_offsets.astype(np.int64), whole.final_rewards(), G, L)
    parts = _split(whole, 7, values, boot_adv=adv_w)
    bounds = np.cumsum([0] + [p.num_positions for p in parts])
    got = [segment_advantages(p, values[a:b], G, L) for p, a, b in zip(parts, bounds, bounds[1:])]  # alone
    np.testing.assert_allclose(np.concatenate([a for a, _, _ in got]), adv_w, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([r for _, r, _ in got]), ret_w, atol=1e-5)
    assert all(j == 0 for _, _, j in got)


def test_a_cut_without_its_continuation_bootstraps_with_the_sign_flip():
    """Two positions of one game, cut after the second: delta_1 = -gamma * B - V_1 (B is the value
    of the next position for its side to move, the opponent of the last mover)."""
    values, boot = np.array([0.2, -0.1], np.float32), np.array([0.5], np.float32)
    adv, ret = compute_gae(values, np.array([0, 2]), np.zeros(1, np.float32), G, L, bootstrap=boot)
    d1 = -G * 0.5 + 0.1
    d0 = -G * -0.1 - 0.2
    np.testing.assert_allclose(adv, [d0 - G * L * d1, d1], atol=1e-6)
    np.testing.assert_allclose(ret, adv + values, atol=1e-6)
    # and with the advantage A_B of the position after the cut: A_1 = delta_1 - gamma * lambda * A_B
    adv2, _ = compute_gae(values, np.array([0, 2]), np.zeros(1, np.float32), G, L, bootstrap=boot,
                          bootstrap_advantage=np.array([0.25], np.float32))
    np.testing.assert_allclose(adv2[1], d1 - G * L * 0.25, atol=1e-6)


def test_segments_join_only_where_the_position_continues(make_batch):
    """Same game number and consecutive plies are not enough: the next segment's first position
    must be the last one after its action (a forged game number joins nothing)."""
    whole = make_batch(300, max_plies=64, seed=32, num_games=4)
    values = whole.value.copy()
    parts = _split(whole, 8, values)
    joined = concat_batches(parts)
    assert chain_segments(joined).joins == len(parts) - whole.num_segments
    forged = copy.deepcopy(joined)
    first_of_second = int(forged.segment_offsets[1])
    forged.hcp[first_of_second] = whole.hcp[0]  # another position (the game's start), same game number and ply
    assert chain_segments(forged).joins == chain_segments(joined).joins - 1
    other_game = copy.deepcopy(joined)
    other_game.game[1] = 12345  # the second segment: neither joins its predecessor nor its successor
    assert chain_segments(other_game).joins == chain_segments(joined).joins - 2


def test_columns_of_a_segment():
    assert set(SEGMENT.names) == {"result", "reason", "bootstrap", "bootstrap_advantage", "game"}
    assert "segment_offsets" in COLUMNS
