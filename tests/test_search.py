"""PUCT tree search (keisei_stream.play.engine): mates, legality, visit accounting, batching,
tree reuse, terminal rules, stop flag, the player. Small random-init nets (configs/tiny.yaml)."""

from __future__ import annotations

import threading
import time

import cshogi
import numpy as np
import pytest
import torch

from keisei_stream.config import load_config
from keisei_stream.play.engine.leaves import LeafBatch
from keisei_stream.play.engine.mcts import MCTS
from keisei_stream.play.engine.search_player import SearchPlayer
from keisei_stream.play.engine.tree import MATE_IN_1, KeptTree, Node, game_end
from keisei_stream.play.evaluation.baselines import RandomPlayer
from keisei_stream.play.evaluation.match import play_game
from keisei_stream.play.evaluation.specs import search_player_from_spec
from keisei_stream.rl.checkpoint import checkpoint_name, save_checkpoint
from keisei_stream.rl.model import build_model
from keisei_stream.shogi import EndReason, VecEnv, encode_observation, legal_moves_and_actions, usi_to_action

from tests.conftest import ROOT

#: Mate in 1, the textbook "head gold" (atama-kin): G*5b, the pawn on 5c guards the gold.
MATE1_SFEN = "4k4/9/4P4/9/9/9/9/9/4K4 b G 1"
MATE1_MOVE = "G*5b"
#: Mates in 3 (no mate in 1). Each is checked below by brute force with cshogi: some first move
#: leaves White only replies after each of which Black mates in one.
MATE3_SFENS = [
    "4k4/9/9/4G1B2/9/9/9/9/4K4 b R 1",
    "5k3/9/1R7/9/9/9/9/9/4K4 b G 1",
]
#: Perpetual check: the rook checks on file 1 then file 2 while the king shuffles 1a <-> 2a.
PERPETUAL_SFEN = "8k/9/7R1/9/9/9/9/9/K8 b - 1"
PERPETUAL_CYCLE = ["2c1c", "1a2a", "1c2c", "2a1a"]
#: Plain repetition: both kings shuffle.
SHUFFLE_SFEN = "k8/9/9/9/9/9/9/9/8K b - 1"
SHUFFLE_CYCLE = ["1i1h", "9a9b", "1h1i", "9b9a"]
#: Entering king: after 5d5c and any White reply, Black (to move) can declare (CSA 27/28 points).
NYUGYOKU_SFEN = "1GSG1GSG1/R1B1B1R2/9/4K4/9/9/9/9/4k4 b 18P2S4N4L 1"
#: Black's only legal move is 9i8h (the king takes the rook); White has replies, none mates.
ONE_LEGAL_SFEN = "8k/9/9/9/9/9/9/1r7/K8 b - 1"
#: Issue 18's position: Black's only legal move is 9i8i, after which White mates in one.
FORCED_LOSS_SFEN = "1p6k/9/9/9/9/9/g8/5+r3/K8 b gs 1"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return model, cfg


def make(tiny, **kw) -> MCTS:
    model, cfg = tiny
    kw.setdefault("max_plies", cfg.env.max_plies)
    return MCTS(model, **kw)


def mates_in_1(board: cshogi.Board, move: int) -> bool:
    board.push(move)
    mated = len(board.legal_moves) == 0
    board.pop()
    return mated


def has_mate_in_1(board: cshogi.Board) -> bool:
    return any(mates_in_1(board, m) for m in list(board.legal_moves))


def wins_in_3(board: cshogi.Board, move: int) -> bool:
    """``move`` mates at once, or every reply allows a mate in one (brute force, cshogi rules)."""
    if mates_in_1(board, move):
        return True
    board.push(move)
    try:
        return all(_reply_loses(board, r) for r in list(board.legal_moves))
    finally:
        board.pop()


def _reply_loses(board: cshogi.Board, reply: int) -> bool:
    board.push(reply)
    try:
        return has_mate_in_1(board)
    finally:
        board.pop()


def random_positions(count: int, seed: int, max_len: int = 120) -> list[cshogi.Board]:
    """Positions from uniformly random playouts (with history), game not over, not nyugyoku."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        b = cshogi.Board()
        for _ in range(int(rng.integers(0, max_len))):
            legal = list(b.legal_moves)
            if not legal:
                break
            b.push(legal[int(rng.integers(len(legal)))])
        if len(b.legal_moves) and not b.is_nyugyoku() and b.is_draw() == cshogi.NOT_REPETITION:
            out.append(b)
    return out


# ------------------------------------------------------------------------------------------------
# encoding


def test_leaf_batch_equals_encode_observation():
    boards = random_positions(12, seed=3)
    batch = LeafBatch(len(boards), max_plies=96)
    for i, b in enumerate(boards):
        batch.add(b, len(b.history), i % 3, list(b.legal_moves))
    obs, moves, actions, counts = batch.finish()
    off = 0
    for i, b in enumerate(boards):
        # plies past the training limit are shown as its last ply (95), the rest as they are
        np.testing.assert_array_equal(obs[i], encode_observation(b, min(len(b.history), 95), i % 3, 96))
        ref_moves, ref_actions = legal_moves_and_actions(b)
        np.testing.assert_array_equal(moves[off:off + counts[i]], ref_moves.astype(np.int64))
        np.testing.assert_array_equal(actions[off:off + counts[i]], ref_actions)
        off += counts[i]
    assert sum(len(b.history) > 95 for b in boards) >= 2 and sum(len(b.history) < 95 for b in boards) >= 2
    batch.clear()  # reused: the piece planes are zeroed again
    b = boards[0]
    batch.add(b, 5, 0, list(b.legal_moves))
    np.testing.assert_array_equal(batch.finish()[0][0], encode_observation(b, 5, 0, 96))
    batch.clear()
    batch.add(b, 400, 0, list(b.legal_moves))
    assert batch.finish()[0][0, 43, 0, 0] == np.float32(95) / np.float32(96)


# ------------------------------------------------------------------------------------------------
# mates


def test_positions_are_what_they_claim():
    b = cshogi.Board(MATE1_SFEN)
    assert mates_in_1(b, b.move_from_usi(MATE1_MOVE))
    for sfen in MATE3_SFENS:
        b = cshogi.Board(sfen)
        assert not has_mate_in_1(b), sfen
        assert any(wins_in_3(b, m) for m in list(b.legal_moves)), sfen


def test_root_mate_search_plays_mate_in_1(tiny):
    s = make(tiny)
    r = s.search(cshogi.Board(MATE1_SFEN), nodes=100)
    assert r.best_usi == MATE1_MOVE and r.mate_in == 1 and r.nodes == 0 and r.value == 1.0


@pytest.mark.parametrize("sfen", MATE3_SFENS)
def test_root_mate_search_finds_mate_in_3(tiny, sfen):
    board = cshogi.Board(sfen)
    r = make(tiny, mate_search_plies=3).search(board, nodes=50)
    assert r.mate_in == 3
    assert wins_in_3(board, r.best_move)
    assert board.sfen() == cshogi.Board(sfen).sfen()  # the caller's board is untouched


@pytest.mark.parametrize("batch_size", [1, 8])
def test_network_only_search_finds_mate_in_1(tiny, batch_size):
    """No mate search at all: the mate's child is a terminal node (no legal reply) valued exactly,
    and PUCT concentrates the visits on it."""
    board = cshogi.Board(MATE1_SFEN)
    s = make(tiny, batch_size=batch_size, mate_search_plies=0, leaf_mate_in_1=False)
    r = s.search(board, nodes=200)
    assert r.mate_in is None and r.nodes == 200
    assert r.best_usi == MATE1_MOVE
    assert r.visits[r.moves.index(r.best_move)] == r.visits.max() > 100
    assert r.value == 1.0


@pytest.mark.parametrize("sfen", MATE3_SFENS)
def test_tree_search_with_leaf_mate_check_wins_mate_in_3(tiny, sfen):
    """Root mate search off; leaves with a mate in one are valued exactly: the tree proves it."""
    board = cshogi.Board(sfen)
    r = make(tiny, batch_size=8, mate_search_plies=0, leaf_mate_in_1=True).search(board, nodes=600)
    assert r.mate_in is None
    assert wins_in_3(board, r.best_move)
    assert r.value > 0.95


# ------------------------------------------------------------------------------------------------
# legality and accounting


def test_never_returns_an_illegal_move(tiny):
    s = make(tiny, batch_size=8, draw_plies=0)  # no move limit: these random games run past 64 plies
    for i, board in enumerate(random_positions(50, seed=11)):
        s.reset()
        r = s.search(board, nodes=16)
        if r.best_usi == "win":
            assert board.is_nyugyoku()
            continue
        assert board.is_legal(r.best_move), (board.sfen(), r.best_usi)
        assert r.best_usi == cshogi.move_to_usi(r.best_move)
        assert r.pv[0] == r.best_usi
        if r.shortcut:  # a mate found, the only legal move, or every move ends the game
            assert r.nodes == r.total_visits == 0 and r.moves == []
            continue
        assert set(r.moves) == set(board.legal_moves)
        assert r.total_visits == 16


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_root_visits_add_up_to_simulations(tiny, batch_size):
    """Convention: the root's own evaluation is not a simulation; each simulation adds one visit to
    one root edge. So visits sum to exactly ``nodes``, and a second search adds ``nodes`` more."""
    board = random_positions(1, seed=5)[0]
    s = make(tiny, batch_size=batch_size, draw_plies=0)
    r = s.search(board, nodes=77)
    assert r.nodes == 77 and int(r.visits.sum()) == 77 == r.total_visits
    assert r.evaluations + r.terminal_hits == 77 + 1  # + the root
    r2 = s.search(board, nodes=40)
    assert r2.reused_visits == 77 and int(r2.visits.sum()) == 117 and r2.nodes == 40
    # n_sum of every node = visits below it; no virtual loss is left in the tree
    stack = [s.root]
    while stack:
        node = stack.pop()
        if node.moves is None:
            continue
        assert node.n_sum == sum(node.n)
        assert all(float(v).is_integer() for v in node.n)
        for idx, child in node.children.items():
            assert not child.pending
            if child.moves is not None:
                assert sum(child.n) == node.n[idx] - 1
            stack.append(child)


def test_visits_exact_with_terminal_children(tiny):
    """Terminal hits are simulations too (here most of them end on the mate)."""
    s = make(tiny, batch_size=8, mate_search_plies=0, leaf_mate_in_1=False)
    r = s.search(cshogi.Board(MATE1_SFEN), nodes=123)
    assert int(r.visits.sum()) == 123 and r.terminal_hits > 0


def test_deterministic_without_noise(tiny):
    board = random_positions(1, seed=6)[0]
    a = make(tiny, batch_size=8, seed=1).search(board, nodes=64)
    b = make(tiny, batch_size=8, seed=2).search(board, nodes=64)
    assert a.best_move == b.best_move and a.moves == b.moves
    np.testing.assert_array_equal(a.visits, b.visits)


def test_dirichlet_noise_and_temperature_only_when_asked(tiny):
    board = cshogi.Board()
    plain = make(tiny).search(board, nodes=0)
    noisy = make(tiny, dirichlet_alpha=0.15, seed=3).search(board, nodes=32)
    assert noisy.total_visits == 32
    a = dict(zip(plain.moves, plain.prior))
    b = dict(zip(noisy.moves, noisy.prior))
    assert max(abs(a[m] - b[m]) for m in a) > 1e-3
    assert abs(float(np.sum(noisy.prior)) - 1.0) < 1e-5
    assert list(noisy.prior) == sorted(noisy.prior, reverse=True)  # edges re-sorted by prior
    chosen = {make(tiny, temperature=1.0, seed=k).search(board, nodes=16).best_move for k in range(8)}
    assert len(chosen) > 1


# ------------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("sfen,move", [(MATE1_SFEN, MATE1_MOVE), ("k8/9/1P7/9/9/9/9/9/4K4 b G 1", "G*8b"),
                                       ("3k5/9/3P5/9/9/9/9/9/4K4 b G 1", "G*6b")])
def test_batched_and_unbatched_agree(tiny, sfen, move):
    """What is asserted: batch 8 and batch 1 choose the same move in positions with exactly one
    winning move (mate in one, network-only search), with the same visit total. What is not:
    identical visit counts -- virtual loss makes the simulations of one batch avoid each other's
    paths, so batch 8 explores differently from batch 1 by design (the network evaluation itself
    is batch-independent: next test)."""
    board = cshogi.Board(sfen)
    assert [m for m in list(board.legal_moves) if mates_in_1(board, m)] == [board.move_from_usi(move)]
    r1 = make(tiny, batch_size=1, mate_search_plies=0, leaf_mate_in_1=False).search(board, nodes=200)
    r8 = make(tiny, batch_size=8, mate_search_plies=0, leaf_mate_in_1=False).search(board, nodes=200)
    assert r1.best_usi == r8.best_usi == move
    assert r1.total_visits == r8.total_visits == 200


def test_batched_leaf_evaluation_equals_single_evaluation(tiny):
    """Exact part of batching: a leaf evaluated inside a batch of 8 gets the same priors and value
    as the same position evaluated alone (its own root, batch 1): same observation (ply and
    repetition planes included), GroupNorm per position."""
    board = random_positions(1, seed=9, max_len=40)[0]
    s = make(tiny, batch_size=8)
    s.search(board, nodes=48)
    checked = 0
    for idx, child in s.root.children.items():
        if child.moves is None:
            continue
        b = board.copy()
        b.push(s.root.moves[idx])
        alone = make(tiny, batch_size=1, mate_search_plies=0).search(b, nodes=0)
        ref = dict(zip(alone.moves, alone.prior.tolist()))
        got = dict(zip(child.moves, child.prior))
        assert ref.keys() == got.keys()
        assert max(abs(ref[m] - got[m]) for m in ref) < 1e-5
        assert abs(alone.root_value - child.value) < 1e-5
        checked += 1
        if checked == 5:
            break
    assert checked == 5


# ------------------------------------------------------------------------------------------------
# tree reuse


def test_tree_reuse_keeps_the_chosen_child(tiny):
    board = cshogi.Board()
    s = make(tiny, batch_size=8)
    r = s.search(board, nodes=200)
    idx = r.moves.index(r.best_move)
    child = s.root.children[idx]
    child_visits = int(r.visits[idx])
    grand = {m: n for m, n in zip(child.moves, child.n)}
    assert s.advance(r.best_move)
    assert s.root is child and sum(child.n) == child_visits - 1
    board.push(r.best_move)
    r2 = s.search(board, nodes=50)
    assert r2.reused_visits == child_visits - 1
    assert r2.total_visits == child_visits - 1 + 50
    for m, n in zip(r2.moves, r2.visits):
        assert n >= grand[m]
    # the opponent's reply is found through the board's history, without advance()
    reply_idx = int(np.argmax(r2.visits))
    reply_node = s.root.children[reply_idx]
    kept = int(sum(reply_node.n))
    board.push(r2.moves[reply_idx])
    r3 = s.search(board, nodes=10)
    assert r3.reused_visits == kept and r3.total_visits == kept + 10
    # an unrelated position drops the tree
    r4 = s.search(cshogi.Board(MATE1_SFEN.replace("G 1", "S 1")), nodes=10)
    assert r4.reused_visits == 0 and r4.total_visits == 10
    assert not s.advance("9i9h")  # not a move of this root: the tree is dropped
    assert s.root is None


def test_reuse_off_starts_fresh(tiny):
    board = cshogi.Board()
    s = make(tiny, reuse_tree=False)
    s.search(board, nodes=20)
    assert s.search(board, nodes=20).reused_visits == 0


def _expanded(board: cshogi.Board) -> Node:
    node = Node(board.zobrist_hash())
    node.moves = list(board.legal_moves)
    node.prior = [1.0 / len(node.moves)] * len(node.moves)
    node.n, node.w = [0.0] * len(node.moves), [0.0] * len(node.moves)
    return node


def test_kept_tree_finds_the_root_only_in_the_same_game():
    """KeptTree without a network: a hand-built root two plies into a game, one expanded child."""
    board = cshogi.Board()
    board.push_usi("7g7f")
    board.push_usi("3c3d")
    history = [m & 0xFFFF for m in board.history]
    root = _expanded(board)
    i = root.child_index(board.move_from_usi("2g2f"))
    board.push_usi("2g2f")
    child = root.children[i] = _expanded(board)
    kept = KeptTree()
    kept.set_root(root, history, 2)
    kept.raw_prior = np.array(root.prior)
    after = [m & 0xFFFF for m in board.history]
    assert kept.find(board, 3, after) is child
    assert kept.find(board, 4, after) is None  # another ply base: another game
    assert kept.find(board, 3, [after[1], after[0], after[2]]) is None  # another game's moves
    board.pop()
    assert kept.find(board, 2, history) is root
    board.push_usi("1g1f")  # not expanded in the tree
    assert kept.find(board, 3, [m & 0xFFFF for m in board.history]) is None
    kept.set_root(root, history, 2)  # the same root keeps the priors kept aside
    assert kept.raw_prior is not None
    assert kept.advance("2g2f") and kept.root is child and kept.raw_prior is None
    assert kept.history16 == after and kept.ply == 3
    assert not kept.advance("8c8d")  # no child there: the tree goes
    assert kept.root is None and kept.history16 == []


# ------------------------------------------------------------------------------------------------
# terminal rules


def _play_vecenv(sfen: str, moves: list[str], max_plies: int = 512):
    env = VecEnv(1, max_plies=max_plies)
    env.reset_game(0, sfen)
    board = cshogi.Board(sfen)
    counts = {board.zobrist_hash(): 1}
    out = []
    for usi in moves:
        res = env.step(np.array([usi_to_action(usi, board.turn)]))
        board.push_usi(usi)
        k = board.zobrist_hash()
        counts[k] = counts.get(k, 0) + 1
        ours = game_end(board, len(board.legal_moves), counts[k], len(board.history), max_plies)
        out.append((int(res.reason[0]), float(res.reward[0]), ours))
        if res.done[0]:
            break
    return out


def _agree(vec_reason: int, vec_reward: float, ours) -> bool:
    """VecEnv's reward is for the last mover; ours is for the side to move: opposite signs."""
    if vec_reason == 0:
        return ours is None
    return ours is not None and int(ours[0]) == vec_reason and ours[1] == -vec_reward


def test_terminal_rules_match_vecenv_perpetual_check():
    steps = _play_vecenv(PERPETUAL_SFEN, PERPETUAL_CYCLE * 3 + PERPETUAL_CYCLE[:1])
    assert all(_agree(*s) for s in steps)
    reason, reward, ours = steps[-1]
    assert reason == EndReason.PERPETUAL_CHECK and len(steps) == 12
    assert ours == (EndReason.PERPETUAL_CHECK, -1.0)  # Black (to move) gave every check: it loses


def test_terminal_rules_match_vecenv_repetition_and_max_plies():
    steps = _play_vecenv(SHUFFLE_SFEN, SHUFFLE_CYCLE * 3)
    assert all(_agree(*s) for s in steps) and steps[-1][0] == EndReason.REPETITION_DRAW
    steps = _play_vecenv(SHUFFLE_SFEN, SHUFFLE_CYCLE * 2, max_plies=6)
    assert all(_agree(*s) for s in steps) and steps[-1][0] == EndReason.MAX_PLIES and len(steps) == 6


def test_terminal_rules_match_vecenv_checkmate_and_entering_king():
    steps = _play_vecenv(MATE1_SFEN, [MATE1_MOVE])
    assert all(_agree(*s) for s in steps) and steps[-1][2] == (EndReason.CHECKMATE, -1.0)
    steps = _play_vecenv(NYUGYOKU_SFEN, ["5d5c", "5i5h"])
    assert all(_agree(*s) for s in steps) and steps[-1][2] == (EndReason.ENTERING_KING, 1.0)


def test_terminal_rules_match_vecenv_random_games():
    """Random games (mostly MAX_PLIES, some mates): every step agrees."""
    rng = np.random.default_rng(0)
    env = VecEnv(1, max_plies=60, seed=1)
    for _ in range(10):
        env.reset_game(0)
        board = cshogi.Board()
        counts = {board.zobrist_hash(): 1}
        while True:
            legal = env.legal_actions(0)
            a = int(legal[rng.integers(len(legal))])
            usi = env.action_usi(np.array([a]))[0]
            res = env.step(np.array([a]))
            board.push_usi(usi)
            k = board.zobrist_hash()
            counts[k] = counts.get(k, 0) + 1
            ours = game_end(board, len(board.legal_moves), counts[k], len(board.history), 60)
            assert _agree(int(res.reason[0]), float(res.reward[0]), ours)
            if res.done[0]:
                break


def test_search_values_repetition_and_entering_king_exactly(tiny):
    # the start position occurred 3 times: the move that recreates it a 4th time is a draw
    board = cshogi.Board(SHUFFLE_SFEN)
    for usi in SHUFFLE_CYCLE * 2 + SHUFFLE_CYCLE[:3]:
        board.push_usi(usi)
    s = make(tiny, batch_size=4, mate_search_plies=0)
    s.search(board, nodes=150)
    idx = s.root.child_index(board.move_from_usi(SHUFFLE_CYCLE[3]))
    child = s.root.children[idx]
    assert child.reason == EndReason.REPETITION_DRAW and child.terminal == 0.0
    assert s.root.w[idx] == 0.0  # every visit backed up exactly 0
    # perpetual check from the searcher's side: the repeating check loses for the checker
    board = cshogi.Board(PERPETUAL_SFEN)
    for usi in PERPETUAL_CYCLE * 2 + PERPETUAL_CYCLE[:3]:
        board.push_usi(usi)
    s = make(tiny, batch_size=4, mate_search_plies=0)
    s.search(board, nodes=60)  # White to move: 2a1a recreates the start (4th time, Black to move)
    idx = s.root.child_index(board.move_from_usi(PERPETUAL_CYCLE[3]))
    child = s.root.children.get(idx)
    assert child is not None and child.reason == EndReason.PERPETUAL_CHECK and child.terminal == -1.0
    assert s.root.w[idx] == s.root.n[idx]  # +1 for White each visit
    # entering king: after 5d5c every White reply lets Black declare, so White's every move ends
    # the game (a loss): answered at once with that exact value, no tree
    board = cshogi.Board(NYUGYOKU_SFEN)
    board.push_usi("5d5c")
    s = make(tiny, batch_size=4, mate_search_plies=0)
    r = s.search(board, nodes=40)
    assert r.shortcut == "every_move_ends_the_game" and r.value == r.root_value == -1.0
    assert r.nodes == r.evaluations == 0 and s.root is None and board.is_legal(r.best_move)
    # at the root itself: declare
    board.push_usi("5i5h")
    assert make(tiny).search(board, nodes=10).best_usi == "win"


def test_max_plies_leaves_are_draws(tiny):
    """At the move limit's last move every move draws: answered at once with the exact value;
    one ply earlier every simulation ends on a draw two plies down, and the tree values it so."""
    board = cshogi.Board()
    s = make(tiny, batch_size=4, draw_plies=1)
    r = s.search(board, nodes=30)
    assert r.shortcut == "every_move_ends_the_game" and r.value == 0.0 and r.evaluations == 0
    s = make(tiny, batch_size=4, draw_plies=2, leaf_mate_in_1=False)
    r = s.search(board, nodes=300)
    grandchildren = [g for c in s.root.children.values() for g in c.children.values()]
    assert grandchildren and all(g.reason == EndReason.MAX_PLIES for g in grandchildren)
    assert r.nodes == 300 == r.evaluations - 1 + r.terminal_hits  # terminal hits count as simulations
    assert r.terminal_hits > 0
    for idx, child in s.root.children.items():  # its network value once, then draws (0) only
        assert s.root.w[idx] == pytest.approx(-child.value, abs=1e-9) and s.root.n[idx] >= 1


def test_leaf_mate_in_1_marks_won_leaves(tiny):
    board = cshogi.Board(MATE3_SFENS[0])
    s = make(tiny, batch_size=8, mate_search_plies=0, leaf_mate_in_1=True)
    s.search(board, nodes=300)
    won = [g for c in s.root.children.values() for g in c.children.values() if g.reason == MATE_IN_1]
    assert won and all(g.terminal == 1.0 for g in won)


def test_no_legal_move_resigns(tiny):
    board = cshogi.Board(MATE1_SFEN)
    board.push_usi(MATE1_MOVE)
    assert make(tiny).search(board, nodes=5).best_usi == "resign"


# ------------------------------------------------------------------------------------------------
# limits


def test_positions_are_what_they_claim_forced_moves():
    b = cshogi.Board(ONE_LEGAL_SFEN)
    assert [cshogi.move_to_usi(m) for m in b.legal_moves] == ["9i8h"]
    b.push_usi("9i8h")
    assert len(b.legal_moves) > 0 and not has_mate_in_1(b)
    b = cshogi.Board(FORCED_LOSS_SFEN)
    assert [cshogi.move_to_usi(m) for m in b.legal_moves] == ["9i8i"]
    b.push_usi("9i8i")
    assert not b.is_check() and has_mate_in_1(b)


def test_the_only_legal_move_is_played_without_a_search(tiny):
    s = make(tiny, batch_size=4)
    board = cshogi.Board(ONE_LEGAL_SFEN)
    r = s.search(board, stop_event=threading.Event())  # go infinite: still answered at once
    assert (r.best_usi, r.shortcut, r.nodes, r.evaluations) == ("9i8h", "one_legal_move", 0, 0)
    assert r.pv == ["9i8h"] and np.isnan(r.value) and not r.stopped
    # a root in the kept tree stays the root (its subtree serves the next search)
    board = cshogi.Board()
    s.search(board, nodes=64)
    child_idx = s.root.child_index(s.root.moves[0])
    kept = s.root
    assert s.search(board, nodes=10).reused_visits == 64 and s.root is kept and child_idx >= 0


def test_every_move_ending_the_game_is_answered_with_the_best_exact_value(tiny):
    """Issue 18: the only move loses to a mate in one (MATE_IN_1 child): answered at once with the
    exact value, under any limit, the time limit too, not searched until the tree-size bound."""
    s = make(tiny, batch_size=4)
    for kw in ({"nodes": 800}, {"time_limit": 0.3}, {"stop_event": threading.Event()}):
        r = s.search(cshogi.Board(FORCED_LOSS_SFEN), **kw)
        assert (r.best_usi, r.shortcut, r.value, r.nodes) == ("9i8i", "every_move_ends_the_game", -1.0, 0)
    # a choice between exact values on the move limit's last move: the mate (checkmate is judged
    # before the limit) beats the draws of every other move; the root mate search is off
    r = make(tiny, draw_plies=1, mate_search_plies=0).search(cshogi.Board(MATE1_SFEN), nodes=50)
    assert (r.best_usi, r.shortcut, r.value) == (MATE1_MOVE, "every_move_ends_the_game", 1.0)


def _terminal_only_tree(tiny, **kw) -> tuple[MCTS, cshogi.Board]:
    """The start position with a move limit of 2 plies, searched once: its 30 children are valued
    by the network; from then on every simulation ends on a draw two plies down (no leaf to queue)."""
    s = make(tiny, batch_size=8, draw_plies=2, leaf_mate_in_1=False, **kw)
    board = cshogi.Board()
    r = s.search(board, nodes=200)
    assert r.evaluations == 1 + len(board.legal_moves) and r.terminal_hits == 200 - len(board.legal_moves)
    return s, board


def test_a_search_of_terminal_hits_keeps_its_deadline_and_its_node_budget(tiny):
    """Issue 18: when simulations only reach terminal nodes no leaf is queued; the search must still
    read the clock and the budget before every simulation. Before, it ran on to the 1,000,000-visit
    tree bound: 13 s for a 0.2 s limit here."""
    s, board = _terminal_only_tree(tiny)
    t = time.perf_counter()
    r = s.search(board, time_limit=0.2)
    wall = time.perf_counter() - t
    assert r.evaluations == 0 and r.terminal_hits == r.nodes > 0
    assert r.total_visits < s.options.max_tree_visits
    assert wall < 0.2 + 2.0  # loose: the bound is the point, not the machine's speed
    r = s.search(board, nodes=5_000)
    assert r.nodes == r.terminal_hits == 5_000 and r.evaluations == 0
    s, board = _terminal_only_tree(tiny, max_tree_visits=3_000)
    r = s.search(board, stop_event=threading.Event())
    assert r.total_visits == 3_000 and not r.stopped


def test_stop_ends_a_search_of_terminal_hits(tiny):
    """Before issue 18 this search answered 20 s after the stop (at the tree bound)."""
    s, board = _terminal_only_tree(tiny)
    ev = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", s.search(board, stop_event=ev)))
    t.start()
    time.sleep(0.3)
    ev.set()
    t.join(timeout=30)
    assert not t.is_alive()
    r = out["r"]
    assert r.stopped and r.terminal_hits == r.nodes > 0 and r.total_visits < s.options.max_tree_visits


def test_stop_event_from_another_thread(tiny):
    s = make(tiny, batch_size=4)
    ev = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", s.search(cshogi.Board(), stop_event=ev)))
    t.start()
    time.sleep(0.3)
    ev.set()
    t.join(timeout=10)
    assert not t.is_alive()
    r = out["r"]
    assert r.stopped and r.nodes > 0 and r.total_visits == r.nodes


def test_stop_method_and_info_callback(tiny):
    s = make(tiny, batch_size=4)
    infos = []

    def on_info(res):
        infos.append(res.nodes)
        if len(infos) == 3:
            s.stop()

    r = s.search(cshogi.Board(), stop_event=threading.Event(), info=on_info, info_interval=0.02)
    assert r.stopped and len(infos) == 3 and infos == sorted(infos)


def test_time_limit(tiny):
    s = make(tiny, batch_size=4)
    t = time.perf_counter()
    r = s.search(cshogi.Board(), time_limit=0.25)
    assert 0.2 <= time.perf_counter() - t < 2.0
    assert r.nodes > 0 and not r.stopped


def test_max_tree_visits_ends_an_infinite_search(tiny):
    s = make(tiny, batch_size=8, max_tree_visits=50)
    r = s.search(cshogi.Board(), stop_event=threading.Event())
    assert r.total_visits == 50 and not r.stopped


def test_bad_limits(tiny):
    s = make(tiny)
    with pytest.raises(ValueError):
        s.search(cshogi.Board())
    with pytest.raises(ValueError):
        s.search(cshogi.Board(), nodes=-1)


# ------------------------------------------------------------------------------------------------
# player


def test_search_player_plays_a_game(tiny):
    model, cfg = tiny
    player = SearchPlayer((model, cfg), nodes=8, batch_size=4, name="s8")
    rec = play_game(player, RandomPlayer(1), max_plies=30, seeds=(0, 1))
    assert rec["reason"] not in ("illegal", "crash", "timeout")
    assert player.last_result is not None
    rec = play_game(RandomPlayer(2), player, max_plies=30, opening=["7g7f"], seeds=(0, 1))
    assert rec["reason"] not in ("illegal", "crash", "timeout")
    player.close()


def test_search_player_from_spec(tmp_path, tiny):
    model, cfg = tiny
    path = save_checkpoint(tmp_path / checkpoint_name(1), model=model, optimizer=None, scheduler=None,
                           version=1, updates=0, config_json=cfg.to_json())
    p = search_player_from_spec(str(path), {"nodes": "12", "batch_size": "4", "leaf_mate_in_1": "false",
                                            "name": "s12"})
    assert p.nodes == 12 and p.mcts.batch_size == 4 and not p.mcts.options.leaf_mate_in_1 and p.name == "s12"
    assert p.mcts.max_plies == cfg.env.max_plies
    assert p.choose(cshogi.Board(), 0) in set(cshogi.Board().legal_moves)
    with pytest.raises(ValueError):
        search_player_from_spec(str(path), {"bogus": "1"})
    with pytest.raises(ValueError):
        search_player_from_spec(str(path), {"nodes": "many"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_search_on_cuda(tiny):
    """Same net on CUDA: tensors on the model's device, same root priors as on the CPU."""
    model, cfg = tiny
    cuda_model = build_model(cfg.model).eval().cuda()
    cuda_model.load_state_dict(model.state_dict())
    s = MCTS(cuda_model, max_plies=cfg.env.max_plies, batch_size=8)
    assert s.device.type == "cuda" and s._batch.tensor.is_pinned()
    r = s.search(cshogi.Board(), nodes=64)
    assert r.total_visits == 64 and cshogi.Board().is_legal(r.best_move)
    ref = make(tiny, batch_size=8).search(cshogi.Board(), nodes=0)
    a = dict(zip(ref.moves, ref.prior.tolist()))
    b = dict(zip(r.moves, r.prior.tolist()))
    assert max(abs(a[m] - b[m]) for m in a) < 1e-4


def test_failed_forward_pass_drops_the_tree(tiny):
    model, cfg = tiny
    calls = {"n": 0}

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("out of memory")
            return self.inner(x)

    s = MCTS(Flaky(), max_plies=cfg.env.max_plies, batch_size=4)
    with pytest.raises(RuntimeError):
        s.search(cshogi.Board(), nodes=40)
    assert s.root is None
    r = s.search(cshogi.Board(), nodes=40)
    assert r.total_visits == 40 and r.reused_visits == 0
