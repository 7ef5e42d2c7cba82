"""Self-play on the worker's side: segments, the bootstrap at a cut, nothing lost at a stop, the
pipelined (GPU) order playing the same games as the plain one, the GPU path's sampler and inputs
against the CPU ones (run here on the CPU; the CUDA worker test runs where CUDA is)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keisei_stream.config import ModelConfig
from keisei_stream.rl.inputs import expand_inputs, expand_on_device
from keisei_stream.rl.model import build_model
from keisei_stream.rl.policy import log_prob_entropy, masked_logits, sample_actions
from keisei_stream.rl.selfplay import SelfPlay, segments_to_batch
from keisei_stream.shogi import NUM_ACTIONS, VecEnv, encode_positions, encode_positions_compact
from keisei_stream.wire.codec import decode_entry, encode_batch

_NET = ModelConfig(channels=8, blocks=1, se=False, value_hidden=16)


def _selfplay(seed=0, **kw) -> SelfPlay:
    torch.manual_seed(0)
    model = build_model(_NET).eval()
    opts = dict(games=6, max_plies=40, segment_plies=8, temperature=1.0, seed=seed)
    opts.update(kw)
    return SelfPlay(model, **opts)


def _play(sp: SelfPlay, steps: int) -> tuple[list, list]:
    segments, records = [], []
    for _ in range(steps):
        st = sp.step(version=1)
        segments += st.segments
        records += st.finished
    return segments, records


def _by_game(segments) -> dict[int, list]:
    """The segments of each game, in the order sent."""
    by_game: dict[int, list] = {}
    for s in segments:
        by_game.setdefault(s.game, []).append(s)
    return by_game


def test_segments_carry_the_value_of_the_position_after_the_cut():
    sp = _selfplay()
    segments, records = _play(sp, 100)
    assert records, "no game ended in 100 steps of 40-ply games"
    by_game = _by_game(segments)
    checked = 0
    for parts in by_game.values():
        for a, b in zip(parts, parts[1:]):
            assert a.reason == 0 and a.num_positions == 8  # a cut segment holds segment_plies positions
            assert int(b.positions["ply"][0]) == int(a.positions["ply"][-1]) + 1
            assert a.bootstrap == pytest.approx(float(b.positions["value"][0]))  # the next position's value
            checked += 1
        assert all(p.reason == 0 for p in parts[:-1])
    assert checked > 10
    ended = [s for s in segments if s.reason]
    assert len(ended) == len(records) and all(s.bootstrap == 0.0 for s in ended)


def test_a_cut_carries_the_advantage_of_the_position_after_it_over_the_look_ahead():
    """Segments of 8 plies sent 8 plies later: a cut's bootstrap advantage is the GAE advantage of
    the next segment's first position over that segment (the look-ahead), bootstrapped from the
    value after it, with the run's gamma and lambda."""
    from keisei_stream.rl.gae import compute_gae

    sp = _selfplay(lookahead_plies=8, gamma=0.9, lam=0.8)
    segments, _ = _play(sp, 120)
    by_game = _by_game(segments)
    checked = 0
    for parts in by_game.values():
        for a, b in zip(parts, parts[1:]):
            if b.reason or b.num_positions != 8:
                continue
            adv, _ = compute_gae(b.positions["value"], np.array([0, 8]), np.zeros(1), 0.9, 0.8,
                                 bootstrap=np.array([b.bootstrap]))
            assert a.bootstrap == pytest.approx(float(b.positions["value"][0]))
            assert a.bootstrap_advantage == pytest.approx(float(adv[0]), abs=1e-6)
            checked += 1
    assert checked > 5


def test_at_a_stop_every_position_played_is_sent():
    sp = _selfplay()
    segments, _ = _play(sp, 37)
    assert sp.unsent_positions > 0
    segments += sp.flush()
    assert sp.unsent_positions == 0
    assert sum(s.num_positions for s in segments) == 37 * 6
    batch = segments_to_batch(segments)
    batch.batch_id, batch.worker_id = "w:0:0", "w"
    fields = {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in encode_batch(batch).items()}
    decoded = decode_entry(fields, max_plies=40)  # every segment, cut or ended, passes the learner's replay
    assert decoded.num_positions == 37 * 6


def test_the_pipelined_order_plays_the_same_games_as_the_plain_one():
    """Two groups, overlapped (a group's forward pass launched while the other's boards step, as on
    a GPU) or taking turns: the same moves, log-probabilities, values and segments for one seed."""
    runs = []
    for overlap in (False, True):
        sp = _selfplay(seed=5, groups=2, overlap=overlap)
        segments, records = _play(sp, 60)
        segments += sp.flush()
        runs.append((segments, [r.moves for r in records]))
    (seg_a, moves_a), (seg_b, moves_b) = runs
    assert moves_a == moves_b and len(moves_a) > 0
    key = lambda s: (s.game & 0xFFFFFFFF, int(s.positions["ply"][0]))  # noqa: E731 - the session prefix is random
    seg_a, seg_b = sorted(seg_a, key=key), sorted(seg_b, key=key)
    assert len(seg_a) == len(seg_b)
    for a, b in zip(seg_a, seg_b):
        assert (a.reason, a.result, a.bootstrap) == (b.reason, b.result, b.bootstrap)
        for name in a.positions:
            np.testing.assert_array_equal(a.positions[name], b.positions[name], err_msg=name)


def test_the_dense_sampler_samples_what_the_sparse_one_does():
    """The GPU worker's sampler (dense, no host sync) against the CPU one given the same noise."""
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((16, NUM_ACTIONS)).astype(np.float32)) * 3
    mask = torch.from_numpy(rng.random((16, NUM_ACTIONS)) < 0.005)
    mask[:, 7] = True
    uniform = torch.from_numpy(rng.random((16, NUM_ACTIONS)).astype(np.float32))
    for temperature in (1.0, 0.5, 0.0):
        a_s, lp_s = sample_actions(logits, mask, temperature, uniform=uniform, dense=False)
        a_d, lp_d = sample_actions(logits, mask, temperature, uniform=uniform, dense=True)
        assert torch.equal(a_s, a_d)
        torch.testing.assert_close(lp_s, lp_d, atol=1e-5, rtol=1e-5)
        assert mask[torch.arange(16), a_d].all()
    # and it samples the tempered distribution: frequencies over many draws
    small = torch.tensor([[0.0, 1.0, 2.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_actions(small, m, 1.0, gen, dense=True)[0] for _ in range(4000)]).squeeze(1)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(masked_logits(small, m), 1)[0], atol=0.03, rtol=0)


def test_the_env_compact_inputs_expand_to_the_dense_ones():
    env = VecEnv(5, 64, seed=3, opening_plies=10)
    compact = env.observe_compact()
    hcp, ply, repetition, _turn = env.positions()
    ref = encode_positions_compact(hcp, ply, repetition, 64)
    for name in ref:
        np.testing.assert_array_equal(compact[name], ref[name], err_msg=name)
    obs, mask = expand_on_device(*(torch.from_numpy(compact[k].astype(np.int64) if k in ("actions", "counts")
                                                    else compact[k]) for k in ("pieces", "scalars", "actions", "counts")))
    dense_obs, dense_mask = env.observe()
    np.testing.assert_array_equal(obs.numpy(), dense_obs)
    np.testing.assert_array_equal(mask.numpy(), dense_mask)
    obs2, mask2 = expand_inputs(ref, "cpu")
    np.testing.assert_array_equal(obs2.numpy(), encode_positions(hcp, ply, repetition, 64)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_worker_path_plays_legal_games_and_sends_everything():
    sp = _selfplay(device="cuda")
    sp.model.cuda()
    assert len(sp.groups) == 2 and sp.overlap
    segments, records = _play(sp, 50)
    segments += sp.flush()
    assert sum(s.num_positions for s in segments) == 50 * 6
    batch = segments_to_batch(segments)
    batch.batch_id, batch.worker_id = "w:0:0", "w"
    fields = {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in encode_batch(batch).items()}
    assert decode_entry(fields, max_plies=40).num_positions == 50 * 6


def test_the_dense_log_prob_and_entropy_equal_the_sparse_ones():
    """What a GPU learner computes (no host sync) equals what the CPU computes, gradients included."""
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.standard_normal((12, NUM_ACTIONS)).astype(np.float32)).requires_grad_()
    mask = torch.from_numpy(rng.random((12, NUM_ACTIONS)) < 0.004)
    mask[:, 11] = True
    actions = torch.tensor([11] * 6 + [12] * 6)  # 12 is mostly illegal: MASK_VALUE there
    lp_s, ent_s = log_prob_entropy(logits, mask, actions, dense=False)
    (lp_s.clamp(min=-50).sum() + ent_s.sum()).backward()
    grad_s = logits.grad.clone()
    logits.grad = None
    lp_d, ent_d = log_prob_entropy(logits, mask, actions, dense=True)
    (lp_d.clamp(min=-50).sum() + ent_d.sum()).backward()
    torch.testing.assert_close(lp_d, lp_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_d, ent_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad, grad_s, atol=1e-5, rtol=1e-5)
