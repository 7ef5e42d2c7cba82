"""VecEnv: end reasons on constructed positions, rewards, records, auto-reset, array contracts."""

from __future__ import annotations

import cshogi
import numpy as np
import pytest

from keisei_stream.shogi import (
    NUM_ACTIONS,
    STARTING_SFEN,
    EndReason,
    GameRecord,
    VecEnv,
    encode_positions,
    usi_to_action,
    validate_sfen,
)


def play(env: VecEnv, game: int, usi: str, rng=None):
    """Step all games: ``usi`` in ``game``, a random legal action elsewhere."""
    rng = rng or np.random.default_rng(0)
    _, mask = env.observe()
    actions = np.array([rng.choice(np.flatnonzero(mask[i])) for i in range(env.num_games)])
    actions[game] = usi_to_action(usi, env.boards[game].turn)
    return env.step(actions)


def replay_final_sfen(record: GameRecord) -> str:
    board = cshogi.Board()
    board.set_position(record.to_usi_position().removeprefix("position "))
    return board.sfen()


def test_checkmate_ends_with_win_for_the_mover():
    env = VecEnv(2, max_plies=50)
    env.reset_game(1, "4k4/9/4P4/9/9/9/9/9/4K4 b G 1")
    res = play(env, 1, "G*5b")
    assert res.done.tolist() == [False, True]
    assert res.reason[1] == EndReason.CHECKMATE and res.reward[1] == 1.0 and res.reward[0] == 0.0
    (rec,) = res.finished
    assert rec.result == 1 and rec.reason == EndReason.CHECKMATE and rec.moves == ["G*5b"] and rec.plies == 1
    assert rec.start_sfen == "4k4/9/4P4/9/9/9/9/9/4K4 b G 1"
    assert rec.to_usi_position() == "position sfen 4k4/9/4P4/9/9/9/9/9/4K4 b G 1 moves G*5b"
    # White mates Black: result -1
    env.reset_game(0, "4k4/9/9/9/9/9/4p4/9/4K4 w g 1")
    res = play(env, 0, "G*5h")
    assert res.reason[0] == EndReason.CHECKMATE and res.reward[0] == 1.0 and res.finished[0].result == -1


def test_repetition_draw_on_the_fourth_occurrence():
    env = VecEnv(1, max_plies=100)
    cycle = ["5i5h", "5a5b", "5h5i", "5b5a"]
    obs_rep = []
    for ply in range(12):
        obs, _ = env.observe()
        obs_rep.append(obs[0, 44, 0, 0])
        res = play(env, 0, cycle[ply % 4])
        if ply < 11:
            assert not res.done[0]
    # the start position is seen at plies 0, 4, 8 (repetition 0, 1/3, 2/3) and ends it at ply 12
    assert np.allclose([obs_rep[0], obs_rep[4], obs_rep[8]], [0, 1 / 3, 2 / 3])
    assert res.done[0] and res.reason[0] == EndReason.REPETITION_DRAW and res.reward[0] == 0.0
    rec = res.finished[0]
    assert rec.result == 0 and rec.plies == 12 and rec.moves == cycle * 3
    assert rec.to_usi_position().startswith("position startpos moves 5i5h 5a5b")
    assert replay_final_sfen(rec).split(" ")[:3] == STARTING_SFEN.split(" ")[:3]


def test_perpetual_check_loses_for_the_checking_side():
    # Black's rook checks on every move (file 1, file 2, ...) while White's king shuffles 1a <-> 2a
    env = VecEnv(1, max_plies=100)
    env.reset_game(0, "8k/9/9/9/9/9/9/9/K6R1 b - 1")
    cycle = ["2i1i", "1a2a", "1i2i", "2a1a"]
    for ply in range(12):
        res = play(env, 0, cycle[ply % 4])
        if ply < 11:
            assert not res.done[0], ply
    # the 4th occurrence comes after White's move; the side to move (Black) was the checker
    assert res.reason[0] == EndReason.PERPETUAL_CHECK
    assert res.reward[0] == 1.0 and res.finished[0].result == -1  # White (last mover) wins

    # the same cycle entered one ply later: Black's check completes the 4th occurrence
    env.reset_game(0, "8k/9/9/9/9/9/9/9/K7R w - 1")
    cycle = cycle[1:] + cycle[:1]
    for ply in range(12):
        res = play(env, 0, cycle[ply % 4])
        if ply < 11:
            assert not res.done[0], ply
    assert res.reason[0] == EndReason.PERPETUAL_CHECK
    assert res.reward[0] == -1.0 and res.finished[0].result == -1  # Black checked forever, loses


def test_entering_king_declaration_wins_for_the_side_to_move():
    # Black: king in the enemy camp, 10 pieces there, 28 points with its hand (CSA 27-point rule)
    sfen = "+R7+B/4K4/+P+P+P+P1+P+P+P+P/9/p8/9/9/9/8k w 4G4S2N 1"
    env = VecEnv(1, max_plies=100)
    env.reset_game(0, sfen)
    res = play(env, 0, "9e9f")
    assert res.reason[0] == EndReason.ENTERING_KING
    assert res.reward[0] == -1.0 and res.finished[0].result == 1  # White moved, Black declares


def test_max_plies_is_a_draw_and_ply_plane_counts():
    env = VecEnv(3, max_plies=4, seed=1)
    rng = np.random.default_rng(1)
    for ply in range(4):
        obs, mask = env.observe()
        assert np.allclose(obs[:, 43], ply / 4)
        _, ply_arr, _, turn = env.positions()
        assert (ply_arr == ply).all() and (turn == ply % 2).all()
        res = env.step(np.array([rng.choice(np.flatnonzero(m)) for m in mask]))
    assert res.done.all() and (res.reason == EndReason.MAX_PLIES).all() and (res.reward == 0).all()
    assert [r.plies for r in res.finished] == [4, 4, 4] and all(r.result == 0 for r in res.finished)
    # auto-reset: every game is back at the start
    obs, mask = env.observe()
    fresh_obs, fresh_mask = VecEnv(3, max_plies=4).observe()
    assert np.array_equal(obs, fresh_obs) and np.array_equal(mask, fresh_mask)
    assert (env.positions()[1] == 0).all()


def test_illegal_actions_raise_and_change_nothing():
    env = VecEnv(2, max_plies=10)
    before = env.positions()[0].copy()
    for bad in ([0, 0], [usi_to_action("7g7f", 0), NUM_ACTIONS], [usi_to_action("7g7f", 0), -1]):
        with pytest.raises(ValueError):
            env.step(np.array(bad))
    with pytest.raises(ValueError):
        env.step(np.array([1]))
    with pytest.raises(ValueError):
        env.step(np.array([1.0, 2.0]))
    assert np.array_equal(env.positions()[0], before)
    for bad in ("not a sfen", "4k4/9/9/9/9/9/9/9/4K4 x - 1", "9/9/9/9/9/9/9/9/9 b - 1",
                "4k4/9/9/9/9/9/9/9/3KK4 b - 1", "4k4/9/9/9/9/9/9/9/4K4 b 19P 1", "4k4/9/9/9/9/9/9/9/4K5 b - 1",
                "4k4/9/9/9/9/9/9/9/4K4 b - 0", "4k4/9/9/9/9/9/9/9/4K4 b +P 1"):
        with pytest.raises(ValueError):
            env.reset_game(0, bad)
    assert validate_sfen("4k4/9/9/9/9/9/9/9/4K4  b  -") == "4k4/9/9/9/9/9/9/9/4K4 b - 1"
    assert validate_sfen(STARTING_SFEN) == STARTING_SFEN
    with pytest.raises(ValueError):
        validate_sfen(None)
    with pytest.raises(ValueError):
        VecEnv(0, 10)
    with pytest.raises(ValueError):
        VecEnv(1, 10, opening_plies=10)


def test_opening_plies_and_records():
    env = VecEnv(4, max_plies=12, seed=3, opening_plies=6)
    _, ply, _, turn = env.positions()
    assert (ply == 6).all() and (turn == 0).all()
    rng = np.random.default_rng(3)
    finished = []
    for _ in range(6):
        _, mask = env.observe()
        finished += env.step(np.array([rng.choice(np.flatnonzero(m)) for m in mask])).finished
    assert len(finished) == 4
    for rec in finished:
        assert rec.start_sfen == STARTING_SFEN and rec.opening_plies == 6 and rec.plies == len(rec.moves) == 12
        d = rec.to_dict()
        assert d["moves"].split() == rec.moves and d["reason"] == "MAX_PLIES" and d["result_str"] == "1/2-1/2"
    # two envs with the same seed play the same openings
    a, b = VecEnv(4, 12, seed=9, opening_plies=6), VecEnv(4, 12, seed=9, opening_plies=6)
    assert np.array_equal(a.positions()[0], b.positions()[0])


def test_random_self_play_consistency():
    """Arrays match the single-position encoders, rewards match records, records replay."""
    env = VecEnv(8, max_plies=60, seed=5, opening_plies=2)
    rng = np.random.default_rng(5)
    n_finished = 0
    for step in range(400):
        obs, mask = env.observe()
        assert obs.shape == (8, 46, 9, 9) and obs.dtype == np.float32
        assert mask.shape == (8, NUM_ACTIONS) and mask.dtype == bool
        if step % 20 == 0:
            hcp, ply, rep, turn = env.positions()
            assert hcp.dtype == np.uint8 and ply.dtype == np.uint16 and rep.dtype == np.uint8 and turn.dtype == np.uint8
            obs2, mask2 = encode_positions(hcp, ply, rep, 60)
            assert np.array_equal(obs, obs2) and np.array_equal(mask, mask2)
        turns = np.array([b.turn for b in env.boards])
        res = env.step(np.array([rng.choice(np.flatnonzero(m)) for m in mask]))
        assert res.reward.dtype == np.float32 and res.done.dtype == bool and res.reason.dtype == np.uint8
        assert (res.reward[~res.done] == 0).all() and (res.reason[~res.done] == 0).all()
        for i, rec in zip(np.flatnonzero(res.done), res.finished):
            sign = 1 if turns[i] == cshogi.BLACK else -1
            assert rec.result == sign * int(res.reward[i]) and rec.reason == res.reason[i]
            board = cshogi.Board()
            board.set_position(rec.to_usi_position().removeprefix("position "))  # replays legally
            assert board.move_number == rec.plies + 1
            if rec.reason == EndReason.CHECKMATE:
                assert board.is_game_over()
            n_finished += 1
    assert n_finished >= 40
