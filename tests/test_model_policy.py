"""Masked policy: illegal actions are never sampled, entropy counts legal actions, log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keisei_stream.rl.model import NUM_ACTIONS
from keisei_stream.rl.policy import (
    MASK_VALUE,
    greedy_actions,
    log_prob_entropy,
    masked_logits,
    sample_actions,
)
from keisei_stream.shogi import VecEnv


def _real_masks(n_positions: int) -> np.ndarray:
    """Legal masks of positions from random self-play with keisei_stream.shogi."""
    env = VecEnv(16, max_plies=80, seed=3)
    gen = torch.Generator().manual_seed(3)
    masks = []
    while sum(len(m) for m in masks) < n_positions:
        _, mask = env.observe()
        masks.append(mask.copy())
        m = torch.from_numpy(mask)
        actions, _ = sample_actions(torch.zeros(m.shape), m, 1.0, gen)
        env.step(actions.numpy())
    return np.concatenate(masks)[:n_positions]


def _random_masks(n_positions: int, rng: np.random.Generator) -> np.ndarray:
    """Random masks with 1..4 legal actions per row (a hard case for a sampler)."""
    mask = np.zeros((n_positions, NUM_ACTIONS), dtype=bool)
    k = rng.integers(1, 5, size=n_positions)
    for i in range(n_positions):
        mask[i, rng.choice(NUM_ACTIONS, size=k[i], replace=False)] = True
    return mask


@pytest.fixture(scope="module")
def position_masks() -> np.ndarray:
    """500 legal masks of real positions (random self-play)."""
    return _real_masks(500)


@pytest.mark.parametrize("temperature,total", [(1.0, 100_000), (0.5, 20_000), (2.0, 20_000)])
def test_never_samples_illegal_actions(temperature, total, position_masks):
    """100,000 draws at temperature 1 (20,000 at 0.5 and 2); illegal actions get the *largest*
    logits to expose any leak."""
    rng = np.random.default_rng(0)
    masks = position_masks
    m = torch.from_numpy(masks)
    logits = torch.from_numpy(rng.standard_normal(masks.shape).astype(np.float32))
    logits = torch.where(m, logits, logits + 50.0)
    gen = torch.Generator().manual_seed(1)
    draws = 0
    while draws < total:
        actions, logp = sample_actions(logits, m, temperature, gen)
        assert bool(m[torch.arange(m.shape[0]), actions].all())
        assert torch.isfinite(logp).all() and bool((logp <= 0).all())
        draws += m.shape[0]


def test_sampling_frequencies_and_logprob_of_tempered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, -1.0]]).repeat(40_000, 1)
    mask = torch.tensor([[True, True, True, False, True]]).repeat(40_000, 1)
    t = 0.7
    actions, logp = sample_actions(logits, mask, t, torch.Generator().manual_seed(0))
    probs = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1.0]) / t, 0)
    freq = torch.bincount(actions, minlength=5).float() / actions.shape[0]
    assert freq[3] == 0
    torch.testing.assert_close(freq[[0, 1, 2, 4]], probs, atol=0.01, rtol=0)
    # log-prob is the one of the tempered distribution that was sampled from
    full = torch.log(probs)
    lookup = {0: full[0], 1: full[1], 2: full[2], 4: full[3]}
    for a in range(5):
        sel = actions == a
        if sel.any():
            torch.testing.assert_close(logp[sel], lookup[a].expand(int(sel.sum())), atol=1e-5, rtol=0)


def test_single_legal_action_is_certain():
    mask = torch.zeros(3, NUM_ACTIONS, dtype=torch.bool)
    mask[0, 7] = mask[1, 13526] = mask[2, 0] = True
    logits = torch.randn(3, NUM_ACTIONS) * 100
    actions, logp = sample_actions(logits, mask, 1.0)
    assert actions.tolist() == [7, 13526, 0]
    torch.testing.assert_close(logp, torch.zeros(3))
    assert greedy_actions(logits, mask).tolist() == [7, 13526, 0]


def test_greedy_ignores_illegal_maximum():
    logits = torch.tensor([[5.0, 1.0, 3.0]])
    mask = torch.tensor([[False, True, True]])
    assert greedy_actions(logits, mask).tolist() == [2]
    actions, logp = sample_actions(logits, mask, 0.0)
    assert actions.tolist() == [2] and float(logp) == 0.0


@pytest.mark.parametrize("k", [1, 2, 7, 300])
def test_entropy_counts_legal_actions_only(k):
    rng = np.random.default_rng(k)
    mask = torch.zeros(2, NUM_ACTIONS, dtype=torch.bool)
    mask[0, torch.from_numpy(rng.choice(NUM_ACTIONS, k, replace=False))] = True
    mask[1, :k] = True
    logits = torch.full((2, NUM_ACTIONS), 0.25)
    logits[~mask] = torch.from_numpy(rng.standard_normal(int((~mask).sum())).astype(np.float32)) * 10
    actions = mask.float().argmax(1)
    logp, ent = log_prob_entropy(logits, mask, actions)
    torch.testing.assert_close(ent, torch.full((2,), math.log(k)), atol=1e-5, rtol=0)
    torch.testing.assert_close(logp, torch.full((2,), -math.log(k)), atol=1e-5, rtol=0)


def test_masked_logits_finite_and_gradients_stay_finite():
    logits = torch.randn(2, NUM_ACTIONS, requires_grad=True)
    mask = torch.zeros(2, NUM_ACTIONS, dtype=torch.bool)
    mask[:, :3] = True
    ml = masked_logits(logits, mask).detach()
    assert torch.isfinite(ml).all() and float(ml[0, 5]) == MASK_VALUE
    logp, ent = log_prob_entropy(logits, mask, torch.tensor([0, 2]))
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert float(logits.grad[:, 3:].abs().max()) == 0.0


def test_bad_inputs_raise():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        sample_actions(logits, torch.zeros(2, 4, dtype=torch.bool))  # no legal action
    with pytest.raises(ValueError):
        sample_actions(logits, torch.ones(2, 3, dtype=torch.bool))  # shape mismatch
    with pytest.raises(ValueError):
        sample_actions(logits, torch.ones(2, 4, dtype=torch.bool), temperature=-1.0)
    with pytest.raises(ValueError):
        masked_logits(logits, torch.ones(2, 4))  # not bool


def test_never_samples_illegal_actions_few_legal():
    """Rows with 1..4 legal actions among 13,527 (random masks), adversarial logits, 50,000 draws."""
    rng = np.random.default_rng(5)
    m = torch.from_numpy(_random_masks(250, rng))
    logits = torch.where(m, torch.zeros(()), torch.full((), 80.0))
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        actions, _ = sample_actions(logits, m, 1.0, gen)
        assert bool(m[torch.arange(m.shape[0]), actions].all())
