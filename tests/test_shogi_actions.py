"""Action space: cshogi move encoding, perft, bijection legal moves <-> actions, python-shogi parity."""

from __future__ import annotations

import cshogi
import numpy as np
import pytest

from keisei_stream.shogi import (
    BOARD_MOVE_ACTIONS,
    NUM_ACTIONS,
    action_to_move,
    action_to_usi,
    legal_mask,
    legal_moves_and_actions,
    moves_to_actions,
    usi_to_action,
)

from tests.helpers import random_positions



def test_cshogi_move_encoding_is_what_the_tables_assume():
    board = cshogi.Board()
    m = board.move_from_usi("7g7f")
    assert m & 0x7F == 6 * 9 + 5 and (m >> 7) & 0x7F == 6 * 9 + 6 and not (m >> 14) & 1
    board = cshogi.Board("4k4/9/9/9/9/9/9/9/4K4 b PLNSGBR 1")
    drops = {cshogi.move_to_usi(m)[0]: (m >> 7) & 0x7F for m in board.legal_moves if cshogi.move_is_drop(m)}
    # drop "from" field = 80 + cshogi piece type (P L N S B R G = 1..7)
    assert drops == {"P": 81, "L": 82, "N": 83, "S": 84, "B": 85, "R": 86, "G": 87}
    board = cshogi.Board("4k4/9/4P4/9/9/9/9/9/4K4 b - 1")
    promo = [m for m in board.legal_moves if cshogi.move_to_usi(m) == "5c5b+"][0]
    assert (promo >> 14) & 1 and cshogi.move_is_promotion(promo)


def test_action_layout_examples():
    # Black 7g7f: from 7g = 60, to 7f = 59 < 60 -> to_idx 59
    assert usi_to_action("7g7f", cshogi.BLACK) == (60 * 80 + 59) * 2
    # the same move seen by White (3c3d is 7g7f rotated)
    assert usi_to_action("3c3d", cshogi.WHITE) == usi_to_action("7g7f", cshogi.BLACK)
    assert usi_to_action("8h2b+", cshogi.BLACK) % 2 == 1
    assert usi_to_action("P*1a", cshogi.BLACK) == BOARD_MOVE_ACTIONS
    assert usi_to_action("R*9i", cshogi.BLACK) == NUM_ACTIONS - 1
    assert usi_to_action("G*1a", cshogi.BLACK) == BOARD_MOVE_ACTIONS + 4 * 81
    assert usi_to_action("P*9i", cshogi.WHITE) == BOARD_MOVE_ACTIONS
    for turn in (0, 1):
        names = [action_to_usi(a, turn) for a in range(NUM_ACTIONS)]
        assert len(set(names)) == NUM_ACTIONS
        assert all(usi_to_action(u, turn) == a for a, u in enumerate(names))


@pytest.mark.parametrize("bad", ["", "7g7g", "7g7f=", "K*5e", "P*5e+", "0a1a", "7g7", 5, None])
def test_usi_to_action_rejects(bad):
    with pytest.raises(ValueError):
        usi_to_action(bad, 0)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError):
        usi_to_action("7g7f", 2)
    for a in (-1, NUM_ACTIONS, 1.5):
        with pytest.raises(ValueError):
            action_to_usi(a, 0)
    with pytest.raises(ValueError):
        moves_to_actions(np.array([0]), 0)  # from == to == 1a
    with pytest.raises(ValueError):
        moves_to_actions(np.array([(88 << 7) | 3]), 0)  # no such drop piece
    with pytest.raises(ValueError):
        moves_to_actions(np.array([-5]), 0)
    with pytest.raises(ValueError):
        action_to_move(cshogi.Board(), usi_to_action("P*5e", 0))
    assert moves_to_actions(np.zeros(0, np.uint32), 1).shape == (0,)


def perft(board: cshogi.Board, depth: int) -> int:
    if depth == 1:
        return len(board.legal_moves)
    total = 0
    for m in list(board.legal_moves):
        board.push(m)
        total += perft(board, depth - 1)
        board.pop()
    return total


@pytest.mark.parametrize("depth,expected", [(1, 30), (2, 900), (3, 25_470), (4, 719_731)])
def test_perft_start_position(depth, expected):
    assert perft(cshogi.Board(), depth) == expected


def test_legal_moves_map_one_to_one_on_10000_random_positions():
    boards = random_positions(10_000, seed=1)
    total_moves = 0
    for board in boards:
        turn = board.turn
        moves, actions = legal_moves_and_actions(board)
        assert moves.dtype == np.uint32 and actions.dtype == np.int64
        assert len(moves) > 0
        assert actions.min() >= 0 and actions.max() < NUM_ACTIONS
        assert len(np.unique(actions)) == len(actions)
        usis = [cshogi.move_to_usi(int(m)) for m in moves]
        assert [action_to_usi(a, turn) for a in actions.tolist()] == usis
        assert [usi_to_action(u, turn) for u in usis] == actions.tolist()
        mask = legal_mask(board)
        assert mask.shape == (NUM_ACTIONS,) and mask.dtype == bool
        assert mask.sum() == len(actions) and mask[actions].all()
        total_moves += len(moves)
    assert total_moves > 10_000 * 20
    # action -> move round trip (on a subset: action_to_move regenerates the move list)
    for board in boards[::10]:
        moves, actions = legal_moves_and_actions(board)
        for m, a in zip(moves.tolist(), actions.tolist()):
            assert action_to_move(board, a) == m


def test_moves_to_actions_accepts_per_move_turns():
    b = cshogi.Board()
    wb = cshogi.Board()
    wb.push_usi("7g7f")
    mb, ab = legal_moves_and_actions(b)
    mw, aw = legal_moves_and_actions(wb)
    moves = np.concatenate([mb, mw])
    turns = np.concatenate([np.zeros(len(mb), int), np.ones(len(mw), int)])
    assert (moves_to_actions(moves, turns) == np.concatenate([ab, aw])).all()


UCHIFUZUME_PINNED = "4kg2R/2S6/4G4/9/9/9/9/9/K8 b P 1"


def test_uchifuzume_with_pinned_capturer_cshogi_is_right():
    """P*5b mates: the king cannot take (5c gold guards 5b), its escapes are covered, and the only
    other capturer, the gold on 4a, is pinned by the rook on 1a. A pawn-drop mate is illegal
    (uchifuzume); python-shogi misses it because it counts the pinned gold as a defender."""
    shogi = pytest.importorskip("shogi")
    board = cshogi.Board(UCHIFUZUME_PINNED)
    assert "P*5b" not in {cshogi.move_to_usi(m) for m in board.legal_moves}
    assert not legal_mask(board)[usi_to_action("P*5b", cshogi.BLACK)]
    ps = shogi.Board(UCHIFUZUME_PINNED)
    assert "P*5b" in {m.usi() for m in ps.legal_moves}
    ps.push_usi("P*5b")
    assert ps.is_checkmate()  # python-shogi itself sees the mate: the drop was a pawn-drop mate
    # and the gold's capture 4a5b is illegal (it would expose the king to the rook on 1a)
    assert "4a5b" not in {m.usi() for m in ps.legal_moves}


def test_legal_moves_agree_with_python_shogi():
    shogi = pytest.importorskip("shogi")
    boards = random_positions(1000, seed=7, max_game_plies=200)
    for board in boards:
        sfen = board.sfen()
        ours = {cshogi.move_to_usi(m) for m in board.legal_moves}
        ps = shogi.Board(sfen)
        theirs = {m.usi() for m in ps.legal_moves}
        assert ours <= theirs, (sfen, ours - theirs)
        for usi in theirs - ours:
            # the only allowed difference: a pawn drop that mates (uchifuzume), which cshogi forbids
            assert usi.startswith("P*"), (sfen, usi)
            ps.push_usi(usi)
            assert ps.is_checkmate(), (sfen, usi)
            ps.pop()
