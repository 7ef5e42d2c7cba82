"""Core46 observation planes and the HCP rebuild used by the learner."""

from __future__ import annotations

import cshogi
import numpy as np
import pytest

from keisei_stream.shogi import (
    NUM_ACTIONS,
    NUM_PLANES,
    encode_observation,
    encode_positions,
    legal_mask,
    usi_to_action,
)

from tests.helpers import random_positions




def sq(usi_square: str) -> int:
    return (int(usi_square[0]) - 1) * 9 + "abcdefghi".index(usi_square[1])


def squares(plane: np.ndarray) -> set[int]:
    return set(np.flatnonzero(plane.ravel()).tolist())


def test_start_position_planes():
    obs = encode_observation(cshogi.Board(), ply=0, repetition=0, max_plies=256)
    assert obs.shape == (NUM_PLANES, 9, 9) and obs.dtype == np.float32
    assert squares(obs[0]) == {sq(f"{f}g") for f in range(1, 10)}          # mover's pawns
    assert squares(obs[1]) == {sq("1i"), sq("9i")}                          # lances
    assert squares(obs[4]) == {sq("4i"), sq("6i")}                          # golds (plane 4)
    assert squares(obs[5]) == {sq("8h")}                                    # bishop
    assert squares(obs[6]) == {sq("2h")}                                    # rook
    assert squares(obs[7]) == {sq("5i")}                                    # king
    assert squares(obs[14]) == {sq(f"{f}c") for f in range(1, 10)}         # opponent's pawns
    assert squares(obs[19]) == {sq("2b")} and squares(obs[20]) == {sq("8b")}
    assert not obs[8:14].any() and not obs[22:42].any()
    assert (obs[42] == 1).all() and (obs[43] == 0).all() and (obs[44] == 0).all() and (obs[45] == 1).all()
    assert obs[:28].sum() == 40


def test_white_to_move_is_rotated_and_scalar_planes():
    board = cshogi.Board()
    board.push_usi("7g7f")
    obs = encode_observation(board, ply=1, repetition=1, max_plies=4)
    # White's pawns seen from White's chair sit on "rank g" of the mover's frame
    assert squares(obs[0]) == {sq(f"{f}g") for f in range(1, 10)}
    # Black's advanced pawn 7f -> rotated 80 - sq = 3d
    assert sq("3d") in squares(obs[14]) and squares(obs[19]) == {sq("2b")}
    assert (obs[42] == 0).all()
    assert np.allclose(obs[43], 0.25) and np.allclose(obs[44], 1 / 3)


def test_hand_planes_and_promoted_pieces():
    board = cshogi.Board("4k4/9/4+P4/9/9/9/9/9/4K1+r2 b 18P2G1B2r4s 1")
    obs = encode_observation(board, ply=0, repetition=2, max_plies=10)
    hand = obs[28:42, 0, 0]
    assert np.allclose(hand[:7], [1, 0, 0, 0, 0.5, 0.5, 0])                # 18P 2G 1B
    assert np.allclose(hand[7:], [0, 0, 0, 1, 0, 0, 1])                     # 4s 2r
    assert (obs[28:42] == hand[:, None, None]).all()
    assert squares(obs[8]) == {sq("5c")} and squares(obs[27]) == {sq("3i")}  # +P, opponent's +R
    assert np.allclose(obs[44], 2 / 3)


def test_out_buffer_and_errors():
    board = cshogi.Board()
    out = np.full((NUM_PLANES, 9, 9), 7.0, np.float32)
    assert encode_observation(board, 0, 0, 10, out=out) is out
    assert np.array_equal(out, encode_observation(board, 0, 0, 10))
    with pytest.raises(ValueError):
        encode_observation(board, 0, 0, 10, out=np.zeros((46, 9, 9), np.float64))
    with pytest.raises(ValueError):
        encode_observation(board, 0, 3, 10)
    with pytest.raises(ValueError):
        encode_observation(board, 0, 0, 0)


def test_colour_swapped_twin_gives_identical_observation_and_mask():
    """The 180-degree-rotated, colour-swapped twin (cshogi.rotate_sfen) is the same position for
    the mover: all planes but 42 (side to move) and the legal actions must be identical."""
    for board in random_positions(300, seed=3):
        twin = cshogi.Board(cshogi.rotate_sfen(board.sfen()))
        assert twin.turn != board.turn
        a = encode_observation(board, 17, 1, 100)
        b = encode_observation(twin, 17, 1, 100)
        keep = np.arange(NUM_PLANES) != 42
        assert np.array_equal(a[keep], b[keep])
        assert np.array_equal(a[42], 1 - b[42])
        assert np.array_equal(legal_mask(board), legal_mask(twin))


def test_encode_positions_matches_single_position_encoders():
    boards = random_positions(1500, seed=5)
    rng = np.random.default_rng(0)
    hcp = np.empty((len(boards), 32), np.uint8)
    for i, b in enumerate(boards):
        b.to_hcp(hcp[i])
    ply = rng.integers(0, 300, len(boards)).astype(np.uint16)
    rep = rng.integers(0, 3, len(boards)).astype(np.uint8)
    obs, mask = encode_positions(hcp, ply, rep, 300)
    assert obs.shape == (len(boards), NUM_PLANES, 9, 9) and obs.dtype == np.float32
    assert mask.shape == (len(boards), NUM_ACTIONS) and mask.dtype == bool
    for i, b in enumerate(boards):
        assert np.array_equal(obs[i], encode_observation(b, int(ply[i]), int(rep[i]), 300))
        assert np.array_equal(mask[i], legal_mask(b))
    buf = (np.full((len(boards) + 3, 46, 9, 9), 5, np.float32), np.ones((len(boards) + 3, NUM_ACTIONS), bool))
    obs3, mask3 = encode_positions(hcp, ply, rep, 300, out=buf)
    assert np.array_equal(obs3, obs) and np.array_equal(mask3, mask) and np.shares_memory(obs3, buf[0])
    with pytest.raises(ValueError):
        encode_positions(hcp, ply, rep, 300, out=(buf[0][:10], buf[1]))
    empty_obs, empty_mask = encode_positions(np.zeros((0, 32), np.uint8), np.zeros(0), np.zeros(0), 10)
    assert empty_obs.shape == (0, 46, 9, 9) and empty_mask.shape == (0, NUM_ACTIONS)


def test_encode_positions_handles_a_mate_position():
    board = cshogi.Board("4k4/4G4/4P4/9/9/9/9/9/4K4 w - 1")  # White is mated
    assert len(board.legal_moves) == 0
    hcp = np.empty((1, 32), np.uint8)
    board.to_hcp(hcp[0])
    obs, mask = encode_positions(hcp, np.array([5]), np.array([0]), 10)
    assert not mask.any() and np.array_equal(obs[0], encode_observation(board, 5, 0, 10))


def test_encode_positions_rejects_bad_input():
    good = np.empty((1, 32), np.uint8)
    cshogi.Board().to_hcp(good[0])
    one = np.zeros(1)
    with pytest.raises(ValueError):
        encode_positions(good.astype(np.int64), one, one, 10)
    with pytest.raises(ValueError):
        encode_positions(good[:, :16], one, one, 10)
    with pytest.raises(ValueError):
        encode_positions(good, np.zeros(2), one, 10)
    with pytest.raises(ValueError):
        encode_positions(good, one, np.array([3]), 10)
    bad_king = good.copy()
    bad_king[0, 0] |= 0xFE  # Black king square field = 127 (cshogi would crash on it)
    with pytest.raises(ValueError, match="king"):
        encode_positions(bad_king, one, one, 10)
    bad_code = good.copy()
    bad_code[0, 2:] = 0xFF
    with pytest.raises(ValueError, match="index 0"):
        encode_positions(bad_code, one, one, 10)
    # a valid one still decodes after a failure
    obs, mask = encode_positions(good, one, one, 10)
    assert mask[0, usi_to_action("7g7f", 0)]
