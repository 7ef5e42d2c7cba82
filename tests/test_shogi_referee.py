"""The referee (keisei_stream.shogi.referee): end reasons and their labels, the repetition tracker,
judge() on hand-made positions for every rule and their order, random openings."""

from __future__ import annotations

import hashlib

import cshogi
import numpy as np
import pytest

from keisei_stream.shogi import (
    BOARD_END_REASONS,
    ONGOING,
    STARTING_SFEN,
    EndReason,
    GameRecord,
    RepetitionTracker,
    VecEnv,
    Verdict,
    can_declare,
    judge,
    random_opening,
    referee,
    repetition_feature,
    usi_to_action,
)
from keisei_stream.shogi import env as env_module

BIG = 10_000  # max_plies that is never reached

# Black's rook checks on every move while White's king shuffles 1a <-> 2a (from test_shogi_env).
ROOK_CHECKS = "8k/9/9/9/9/9/9/9/K6R1 b - 1"
ROOK_CYCLE = ["2i1i", "1a2a", "1i2i", "2a1a"]
# Black: king in the enemy camp, 10 pieces there, 28 points with its hand; White to move.
DECLARE_AFTER_WHITE = "+R7+B/4K4/+P+P+P+P1+P+P+P+P/9/p8/9/9/9/8k w 4G4S2N 1"


def rotate_usi(usi: str) -> str:
    """The same move seen from the other side (board rotated 180 degrees)."""
    def sq(s: str) -> str:
        return f"{10 - int(s[0])}{chr(ord('a') + ord('i') - ord(s[1]))}"
    if usi[1] == "*":
        return usi[:2] + sq(usi[2:4])
    return sq(usi[0:2]) + sq(usi[2:4]) + usi[4:]


def play_out(sfen: str, moves: list[str], max_plies: int = BIG) -> list[tuple[Verdict, int]]:
    """Play ``moves`` from ``sfen``, judging after each; returns ``(verdict, board.turn)`` per move."""
    board = cshogi.Board(sfen)
    tracker = RepetitionTracker(board)
    out = []
    for ply, usi in enumerate(moves, 1):
        board.push_usi(usi)
        out.append((judge(board, tracker.push(board), ply, max_plies), board.turn))
    return out


# ------------------------------------------------------------------------------------------------
# end reasons


def test_end_reason_codes_are_the_wire_format():
    assert [(r.name, int(r)) for r in EndReason] == [
        ("NONE", 0), ("CHECKMATE", 1), ("REPETITION_DRAW", 2), ("PERPETUAL_CHECK", 3), ("ENTERING_KING", 4),
        ("MAX_PLIES", 5), ("ILLEGAL", 6), ("RESIGN", 7), ("TIMEOUT", 8), ("CRASH", 9)]
    assert BOARD_END_REASONS == (EndReason.CHECKMATE, EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK,
                                 EndReason.ENTERING_KING, EndReason.MAX_PLIES)


def test_end_reason_labels_round_trip():
    assert [r.label for r in EndReason] == [
        "unknown", "checkmate", "repetition", "perpetual_check", "entering_king", "max_plies", "illegal",
        "resign", "timeout", "crash"]
    for r in EndReason:
        assert EndReason.from_label(r.label) is r
        assert EndReason.from_label(r.name) is r
        assert EndReason.from_label(r.name.lower()) is r
        assert EndReason.from_label(str(int(r))) is r
    assert EndReason.from_label("  Repetition\n") is EndReason.REPETITION_DRAW
    for bad in ("", "draw", "99", "-1", "checkmate!"):
        with pytest.raises(ValueError):
            EndReason.from_label(bad)
    # one class, wherever it is imported from
    assert env_module.EndReason is referee.EndReason is EndReason
    assert env_module.GameRecord is referee.GameRecord is GameRecord


# ------------------------------------------------------------------------------------------------
# repetitions


def test_tracker_counts_push_pop_and_feature():
    board = cshogi.Board()
    t = RepetitionTracker(board)
    assert t.count(board) == 1 and t.feature(board) == 0 and len(t) == 1
    counts = []
    for usi in ["5i5h", "5a5b", "5h5i", "5b5a"] * 3:
        board.push_usi(usi)
        counts.append(t.push(board))
    assert counts == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert t.count(board) == 4 and t.feature(board) == 2 and len(t) == 4
    t.pop(board)
    assert t.count(board) == 3
    board.pop()
    t.pop(board)
    assert t.count(board) == 2
    other = cshogi.Board("4k4/9/9/9/9/9/9/9/4K4 b - 1")
    assert t.count(other) == 0
    t.push(other)
    t.pop(other)
    assert t.count(other) == 0 and len(t) == 4
    assert RepetitionTracker().count(board) == 0
    assert "4 positions" in repr(t)


def test_repetition_feature_scalars_and_arrays():
    assert [repetition_feature(c) for c in (1, 2, 3, 4, 9)] == [0, 1, 2, 2, 2]
    arr = repetition_feature(np.array([1, 2, 3, 4, 9], dtype=np.int64))
    assert arr.tolist() == [0, 1, 2, 2, 2] and arr.dtype == np.int64


# ------------------------------------------------------------------------------------------------
# verdicts


def test_verdict_winner_and_result():
    assert not ONGOING and ONGOING.reason == EndReason.NONE
    assert ONGOING.winner(0) is None and ONGOING.result(0) == 0 and ONGOING.result(1) == 0
    v = Verdict(EndReason.CHECKMATE, 1)  # the last mover won
    assert v and v.winner(cshogi.WHITE) == cshogi.BLACK and v.result(cshogi.WHITE) == 1
    assert v.winner(cshogi.BLACK) == cshogi.WHITE and v.result(cshogi.BLACK) == -1
    v = Verdict(EndReason.ENTERING_KING, -1)  # the side to move won
    assert v.winner(cshogi.BLACK) == cshogi.BLACK and v.result(cshogi.BLACK) == 1
    assert v.winner(cshogi.WHITE) == cshogi.WHITE and v.result(cshogi.WHITE) == -1
    d = Verdict(EndReason.MAX_PLIES, 0)
    assert d and d.winner(0) is None and d.result(1) == 0


# ------------------------------------------------------------------------------------------------
# judge: every rule


@pytest.mark.parametrize("sfen,move,winner", [
    ("4k4/9/4P4/9/9/9/9/9/4K4 b G 1", "G*5b", cshogi.BLACK),
    ("4k4/9/9/9/9/9/4p4/9/4K4 w g 1", "G*5h", cshogi.WHITE),
])
def test_checkmate_wins_for_the_mover(sfen, move, winner):
    board = cshogi.Board(sfen)
    before = judge(board, 1, 0, BIG)
    assert before is ONGOING
    board.push_usi(move)
    for has_legal in (None, False):
        v = judge(board, 1, 1, BIG, has_legal)
        assert v.reason == EndReason.CHECKMATE and v.mover_score == 1
        assert v.winner(board.turn) == winner and v.result(board.turn) == (1 if winner == cshogi.BLACK else -1)


def test_fourfold_repetition_is_a_draw_and_not_before():
    cycle = ["5i5h", "5a5b", "5h5i", "5b5a"]
    verdicts = play_out(STARTING_SFEN, cycle * 3)
    assert all(v is ONGOING for v, _ in verdicts[:-1])
    v, turn = verdicts[-1]
    assert v.reason == EndReason.REPETITION_DRAW and v.mover_score == 0 and v.winner(turn) is None
    # White starts the cycle: the 4th occurrence comes after Black's move, still a draw
    board = cshogi.Board()
    board.push_usi("7g7f")
    verdicts = play_out(board.sfen(), ["5a5b", "5i5h", "5b5a", "5h5i"] * 3)
    assert all(not v for v, _ in verdicts[:-1]) and verdicts[-1][0].reason == EndReason.REPETITION_DRAW


@pytest.mark.parametrize("colour", ["black", "white"])
def test_perpetual_check_loses_for_the_checking_side(colour):
    sfen, cycle = ROOK_CHECKS, list(ROOK_CYCLE)
    checker = cshogi.BLACK
    if colour == "white":
        sfen, cycle, checker = cshogi.rotate_sfen(sfen), [rotate_usi(m) for m in cycle], cshogi.WHITE
    # the 4th occurrence after the defender's move: the side to move gave the checks (REPETITION_LOSE)
    verdicts = play_out(sfen, cycle * 3)
    assert all(not v for v, _ in verdicts[:-1])
    v, turn = verdicts[-1]
    assert turn == checker and v.reason == EndReason.PERPETUAL_CHECK and v.mover_score == 1
    assert v.winner(turn) == 1 - checker

    # the 4th occurrence after the checker's move (REPETITION_WIN for the side to move)
    board = cshogi.Board(sfen)
    board.push_usi(cycle[0])
    verdicts = play_out(board.sfen(), (cycle[1:] + cycle[:1]) * 3)
    assert all(not v for v, _ in verdicts[:-1])
    v, turn = verdicts[-1]
    assert turn == 1 - checker and v.reason == EndReason.PERPETUAL_CHECK and v.mover_score == -1
    assert v.winner(turn) == 1 - checker


@pytest.mark.parametrize("colour", ["black", "white"])
def test_entering_king_declaration_wins_for_the_side_to_move(colour):
    sfen, move, declarer = DECLARE_AFTER_WHITE, "9e9f", cshogi.BLACK
    if colour == "white":
        sfen, move, declarer = cshogi.rotate_sfen(sfen), rotate_usi(move), cshogi.WHITE
    board = cshogi.Board(sfen)
    assert not can_declare(board)  # not this side's turn
    board.push_usi(move)
    assert can_declare(board) and board.turn == declarer
    v = judge(board, 1, 1, BIG)
    assert v.reason == EndReason.ENTERING_KING and v.mover_score == -1 and v.winner(board.turn) == declarer


def test_entering_king_needs_the_points_and_no_check():
    # 10 pieces in the camp; Black needs 28 points: 2R B 3P in hand = 18 + 10 on the board
    assert can_declare(cshogi.Board("PPPPKPPPP/GG7/9/9/9/9/9/9/4k4 b 2RB3P 1"))
    assert not can_declare(cshogi.Board("PPPPKPPPP/GG7/9/9/9/9/9/9/4k4 b 2RB2P 1"))  # 27: not enough
    assert can_declare(cshogi.Board(cshogi.rotate_sfen("PPPPKPPPP/GG7/9/9/9/9/9/9/4k4 b 2RB2P 1")))  # White: 27
    assert not can_declare(cshogi.Board("PPPPK1PPP/GG7/9/9/9/9/9/9/4k4 b 2RB4P 1"))  # 9 pieces in the camp
    checked = cshogi.Board("PPPPKPPPP/GG7/4r4/9/9/9/9/9/4k4 b 2RB3P 1")
    assert checked.is_check() and not can_declare(checked)
    assert judge(checked, 1, 0, BIG) is ONGOING


def test_max_plies_is_a_draw():
    board = cshogi.Board()
    board.push_usi("7g7f")
    assert judge(board, 1, 9, 10) is ONGOING
    for ply in (10, 11):
        v = judge(board, 1, ply, 10)
        assert v.reason == EndReason.MAX_PLIES and v.mover_score == 0 and v.result(board.turn) == 0


def test_the_order_of_the_rules():
    """checkmate > 4-fold repetition > entering-king declaration > max plies."""
    mate = cshogi.Board("4k4/9/4P4/9/9/9/9/9/4K4 b G 1")
    mate.push_usi("G*5b")
    assert judge(mate, 4, 10, 10).reason == EndReason.CHECKMATE
    declare = cshogi.Board(DECLARE_AFTER_WHITE)
    declare.push_usi("9e9f")
    # no history: is_draw() finds no cycle, so a 4th occurrence is a plain repetition draw
    assert judge(declare, 4, 10, 10).reason == EndReason.REPETITION_DRAW
    assert judge(declare, 3, 10, 10).reason == EndReason.ENTERING_KING
    # a real perpetual check reaching max plies on the same move: the repetition wins
    verdicts = play_out(ROOK_CHECKS, ROOK_CYCLE * 3, max_plies=12)
    assert [bool(v) for v, _ in verdicts] == [False] * 11 + [True]
    assert verdicts[-1][0].reason == EndReason.PERPETUAL_CHECK
    # ... and in VecEnv: a declaration on the max_plies-th move is ENTERING_KING
    env = VecEnv(1, max_plies=1)
    env.reset_game(0, DECLARE_AFTER_WHITE)
    res = env.step(np.array([usi_to_action("9e9f", cshogi.WHITE)]))
    assert res.reason[0] == EndReason.ENTERING_KING and res.finished[0].result == 1


def test_vecenv_refuses_a_start_that_is_already_over():
    env = VecEnv(1, max_plies=10)
    declarable = cshogi.Board(DECLARE_AFTER_WHITE)
    declarable.push_usi("9e9f")
    for sfen in (declarable.sfen(), "4k4/4G4/4P4/9/9/9/9/9/4K4 w - 1"):  # declaration possible; mated
        with pytest.raises(ValueError, match="already over"):
            env.reset_game(0, sfen)


# ------------------------------------------------------------------------------------------------
# random openings


def test_random_opening_plays_a_going_game():
    board = cshogi.Board()
    moves, tracker, legal = random_opening(board, 12, np.random.default_rng(4))
    assert len(moves) == 12 and board.move_number == 13
    assert sorted(legal) == sorted(board.legal_moves) and legal
    replay = cshogi.Board()
    for m in moves:
        replay.push(m)
    assert replay.sfen() == board.sfen()
    assert sum(tracker.counts.values()) == 13 and tracker.count(board) >= 1
    # same generator state, same opening; no moves: the start itself
    again = random_opening(cshogi.Board(), 12, np.random.default_rng(4))
    assert again[0] == moves
    none = cshogi.Board()
    assert random_opening(none, 0, np.random.default_rng(0))[0] == [] and none.sfen() == STARTING_SFEN
    # from an SFEN
    start = "4k4/9/9/9/9/9/9/9/4K4 b 2G 1"
    moves, _, _ = random_opening(board, 3, np.random.default_rng(1), start)
    replay = cshogi.Board(start)
    for m in moves:
        replay.push(m)
    assert replay.sfen() == board.sfen()


def test_random_opening_draws_one_number_per_ply():
    """The generator is advanced exactly as VecEnv always did: one ``integers(len(legal))`` per ply
    over cshogi's legal-move order (seeded self-play and evaluation openings stay the same)."""
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    moves, _, _ = random_opening(cshogi.Board(), 30, rng)
    board = cshogi.Board()
    for m in moves:
        legal = list(board.legal_moves)
        assert m == legal[int(ref.integers(len(legal)))]
        board.push(m)
    assert rng.integers(1 << 30) == ref.integers(1 << 30)


def test_random_opening_retries_games_that_ended():
    """200 random plies from the start: some attempts end in mate (or repetition) and are retried;
    what comes back never ended and has a legal move."""
    board = cshogi.Board()
    retried = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        moves, tracker, legal = random_opening(board, 200, rng)
        replay, t = cshogi.Board(), RepetitionTracker(cshogi.Board())
        for ply, m in enumerate(moves, 1):
            replay.push(m)
            assert not judge(replay, t.push(replay), ply, BIG)
        assert legal and t.counts == tracker.counts
        # was it the first attempt? redo one attempt's draws with a fresh generator
        ref, first = np.random.default_rng(seed), cshogi.Board()
        for m in moves:
            ml = list(first.legal_moves)
            if not ml:
                break
            first.push(ml[int(ref.integers(len(ml)))])
        retried += first.sfen() != board.sfen() or rng.bit_generator.state != ref.bit_generator.state
    assert 0 < retried < 20


def test_random_opening_errors():
    mated = "4k4/4G4/4P4/9/9/9/9/9/4K4 w - 1"
    with pytest.raises(ValueError, match="already over"):
        random_opening(cshogi.Board(), 4, np.random.default_rng(0), mated)
    with pytest.raises(ValueError, match="no playable"):
        random_opening(cshogi.Board(), 4, np.random.default_rng(0), max_tries=0)


def test_random_opening_matches_evaluation_openings():
    """Evaluation's 8-ply openings (``play.match.random_opening``, now the referee's) are the same
    moves as before the referee existed: the digest of seeds 0-29 was computed with the old
    evaluation code (commit 2b4a03b, ``play/evaluation.py``)."""
    digest = hashlib.sha256()
    for seed in range(30):
        moves, _, _ = random_opening(cshogi.Board(), 8, np.random.default_rng(seed))
        digest.update(" ".join(cshogi.move_to_usi(m) for m in moves).encode() + b"\n")
    assert digest.hexdigest() == "16a9a1f5f0dff44eda6814d44f9abddaa718f8637487bf0b9ac833791ae5bfd7"
