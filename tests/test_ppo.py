"""Self-play GAE against hand-computed values, staleness filter, LR schedule, and the PPO update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keisei_stream.config import ModelConfig, PPOConfig
from keisei_stream.rl.model import NUM_ACTIONS, build_model
from keisei_stream.rl.policy import act, log_prob_entropy
from keisei_stream.rl.gae import compute_gae, filter_stale
from keisei_stream.rl.ppo import lr_factor, make_optimizer, make_scheduler, ppo_update

G, L = 0.9, 0.8  # gamma, lambda used in the hand computations (gamma * lambda = 0.72)


def _gae(values, rewards, gamma=G, lam=L):
    values = np.asarray(values, dtype=np.float32)
    return compute_gae(values, np.array([0, len(values)]), np.array([rewards], dtype=np.float32), gamma, lam)


def _reference_gae(values, offsets, final_rewards, gamma, lam):
    """Straightforward per-position loop, for comparison with the vectorised scan."""
    adv = np.zeros(len(values))
    for g in range(len(offsets) - 1):
        a_next = 0.0
        for t in range(offsets[g + 1] - 1, offsets[g] - 1, -1):
            if t == offsets[g + 1] - 1:
                delta = final_rewards[g] - values[t]
                adv[t] = delta
            else:
                delta = -gamma * values[t + 1] - values[t]
                adv[t] = delta - gamma * lam * a_next
            a_next = adv[t]
    return adv, adv + values


def test_gae_win():
    # 3 plies, the last mover (ply 2) mates: r_final = +1.
    # delta_2 = 1 - 0.3 = 0.7; delta_1 = -0.9*0.3 + 0.2 = -0.07; delta_0 = -0.9*(-0.2) - 0.1 = 0.08
    # A_2 = 0.7; A_1 = -0.07 - 0.72*0.7 = -0.574; A_0 = 0.08 + 0.72*0.574 = 0.49328
    adv, ret = _gae([0.1, -0.2, 0.3], 1.0)
    np.testing.assert_allclose(adv, [0.49328, -0.574, 0.7], atol=1e-6)
    np.testing.assert_allclose(ret, [0.59328, -0.774, 1.0], atol=1e-6)
    assert adv.dtype == np.float32 and ret.dtype == np.float32


def test_gae_loss_by_perpetual_check():
    # 2 plies, the last mover (the checking side) loses by perpetual check: r_final = -1.
    # delta_1 = -1 + 0.4 = -0.6; delta_0 = -0.9*(-0.4) - 0.5 = -0.14; A_0 = -0.14 + 0.72*0.6 = 0.292
    adv, ret = _gae([0.5, -0.4], -1.0)
    np.testing.assert_allclose(adv, [0.292, -0.6], atol=1e-6)
    np.testing.assert_allclose(ret, [0.792, -1.0], atol=1e-6)


def test_gae_draw():
    # repetition draw after 3 plies: r_final = 0.
    # delta_2 = 0.3; delta_1 = 0.27 - 0.1 = 0.17; delta_0 = -0.09 - 0.2 = -0.29
    # A_2 = 0.3; A_1 = 0.17 - 0.216 = -0.046; A_0 = -0.29 + 0.72*0.046 = -0.25688
    adv, ret = _gae([0.2, 0.1, -0.3], 0.0)
    np.testing.assert_allclose(adv, [-0.25688, -0.046, 0.3], atol=1e-6)
    np.testing.assert_allclose(ret, [-0.05688, 0.054, 0.0], atol=1e-6)


def test_gae_max_plies_is_a_draw_without_bootstrap():
    # A game cut at max plies: final reward 0, the last position's return is exactly 0 whatever
    # its value (no bootstrap from a position that was never played).
    adv, ret = _gae([0.9, 0.9, 0.9, 0.9], 0.0)
    assert ret[-1] == 0.0
    np.testing.assert_allclose(adv[-1], -0.9, atol=1e-7)


def test_gae_monte_carlo_limit_alternates_sign():
    # gamma = lambda = 1: returns are the final outcome seen from each mover's side.
    _, ret = _gae([0.3, -0.1, 0.7, 0.2, -0.5], 1.0, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [1, -1, 1, -1, 1], atol=1e-6)
    _, ret = _gae([0.3, -0.1, 0.7, 0.2], -1.0, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [1, -1, 1, -1], atol=1e-6)


def test_gae_one_ply_game():
    adv, ret = _gae([0.25], 1.0)
    np.testing.assert_allclose(adv, [0.75])
    np.testing.assert_allclose(ret, [1.0])


def test_gae_several_games_no_bootstrap_across_games():
    games = [([0.1, -0.2, 0.3], 1.0), ([0.5, -0.4], -1.0), ([0.2, 0.1, -0.3], 0.0), ([0.25], 1.0)]
    values = np.concatenate([np.array(v, np.float32) for v, _ in games])
    offsets = np.concatenate([[0], np.cumsum([len(v) for v, _ in games])]).astype(np.int64)
    rewards = np.array([r for _, r in games], np.float32)
    adv, ret = compute_gae(values, offsets, rewards, G, L)
    for g, (v, r) in enumerate(games):
        a1, r1 = _gae(v, r)
        np.testing.assert_allclose(adv[offsets[g]:offsets[g + 1]], a1, atol=1e-6)
        np.testing.assert_allclose(ret[offsets[g]:offsets[g + 1]], r1, atol=1e-6)
    # changing the next game's values leaves this game's advantages alone
    values2 = values.copy()
    values2[offsets[1]:] = 0.99
    adv2, _ = compute_gae(values2, offsets, rewards, G, L)
    np.testing.assert_array_equal(adv2[: offsets[1]], adv[: offsets[1]])


def test_gae_matches_reference_loop_on_random_games():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.uniform(-1, 1, offsets[-1]).astype(np.float32)
    rewards = rng.choice([-1.0, 0.0, 1.0], size=40).astype(np.float32)
    adv, ret = compute_gae(values, offsets, rewards, 0.99, 0.95)
    ref_adv, ref_ret = _reference_gae(values.astype(np.float64), offsets, rewards, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_empty_games_and_bad_offsets():
    adv, ret = compute_gae(np.array([0.5], np.float32), np.array([0, 0, 1]), np.array([1.0, -1.0], np.float32), G, L)
    np.testing.assert_allclose(adv, [-1.5])
    with pytest.raises(ValueError):
        compute_gae(np.zeros(3, np.float32), np.array([0, 2]), np.array([1.0], np.float32), G, L)
    with pytest.raises(ValueError):
        compute_gae(np.zeros(3, np.float32), np.array([0, 2, 1, 3]), np.zeros(3, np.float32), G, L)
    with pytest.raises(ValueError):
        compute_gae(np.zeros(3, np.float32), np.array([0, 3]), np.zeros(2, np.float32), G, L)


def test_filter_stale():
    keep = filter_stale(np.array([1, 5, 6, 9, 10, 11]), current_version=10, max_policy_lag=4)
    assert keep.tolist() == [False, False, True, True, True, True]
    assert filter_stale(np.array([10, 9]), 10, 0).tolist() == [True, False]


def test_lr_schedules():
    base = dict(learning_rate=1.0, lr_schedule_updates=100, lr_final_fraction=0.1)
    const = PPOConfig(**base, lr_schedule="constant")
    lin = PPOConfig(**base, lr_schedule="linear")
    cos = PPOConfig(**base, lr_schedule="cosine")
    assert lr_factor(50, const) == 1.0
    assert lr_factor(0, lin) == 1.0 and math.isclose(lr_factor(50, lin), 0.55)
    assert math.isclose(lr_factor(100, lin), 0.1) and math.isclose(lr_factor(500, lin), 0.1)
    assert lr_factor(0, cos) == 1.0 and math.isclose(lr_factor(50, cos), 0.55)
    assert math.isclose(lr_factor(100, cos), 0.1) and math.isclose(lr_factor(1000, cos), 0.1)
    model = build_model(_TINY)
    opt = make_optimizer(model, lin)
    sch = make_scheduler(opt, lin)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    np.testing.assert_allclose(seen, [1.0, 0.991, 0.982])


# ----------------------------------------------------------------------------------------------
_TINY = ModelConfig(channels=8, blocks=1, se=True, se_ratio=2, policy_planes=2, value_hidden=16)


def _fixed_batch(model, n=96, seed=0, sample_seed=None):
    """A batch with 3 legal actions per position; action 0 of the three has advantage +1, others -1.

    Observations and legal sets depend on ``seed`` only; the actions are sampled from ``model``
    with ``sample_seed`` (default ``seed``), so a new sample seed is a fresh on-policy batch."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 46, 9, 9)).astype(np.float32)
    mask = np.zeros((n, NUM_ACTIONS), dtype=bool)
    legal = np.stack([rng.choice(NUM_ACTIONS, 3, replace=False) for _ in range(n)])
    mask[np.arange(n)[:, None], legal] = True
    model.eval()
    gen = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    actions, logp, value = act(model, obs, mask, 1.0, generator=gen)
    model.train()
    good = legal[:, 0]
    adv = np.where(actions == good, 1.0, -1.0).astype(np.float32)
    ret = np.where(np.arange(n) % 2 == 0, 0.8, -0.8).astype(np.float32)
    batch = {
        "obs": torch.from_numpy(obs), "mask": torch.from_numpy(mask), "action": torch.from_numpy(actions),
        "log_prob": torch.from_numpy(logp), "value": torch.from_numpy(value),
        "advantage": torch.from_numpy(adv), "return": torch.from_numpy(ret),
    }
    return batch, torch.from_numpy(good)


def _eval(model, batch, good):
    """(mean log-prob of the positive-advantage actions, value MSE) in eval mode."""
    model.eval()
    with torch.no_grad():
        logits, value = model(batch["obs"])
        logp, _ = log_prob_entropy(logits, batch["mask"], good)
    model.train()
    return float(logp.mean()), float(((value - batch["return"]) ** 2).mean())


def test_ppo_update_moves_probability_and_reduces_loss():
    torch.manual_seed(0)
    model = build_model(_TINY)
    cfg = PPOConfig(learning_rate=3e-3, epochs=4, minibatch_size=32, target_kl=None, entropy_coef=0.0)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg)
    batch, good = _fixed_batch(model)
    logp0, mse0 = _eval(model, batch, good)
    first = ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False)
    assert _eval(model, batch, good)[0] > logp0  # the first update already helps
    for k in range(1, 5):
        batch, _ = _fixed_batch(model, sample_seed=k)  # on-policy: fresh actions from the current policy
        last = ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False)
    logp1, mse1 = _eval(model, batch, good)
    assert logp1 > logp0 + 0.2, (logp0, logp1)
    assert mse1 < mse0
    # (policy losses of fresh on-policy batches are not comparable: each starts near -mean(A) = 0)
    assert last["value_loss"] < first["value_loss"]
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "explained_variance",
                "grad_norm", "learning_rate", "epochs_run", "minibatches"):
        assert isinstance(first[key], float), key
    assert first["minibatches"] == 4 * 3 and first["epochs_run"] == 4
    assert 0 <= first["entropy"] <= math.log(3) + 1e-5


def test_ppo_value_clip_and_kl_early_stop():
    torch.manual_seed(0)
    model = build_model(_TINY)
    cfg = PPOConfig(learning_rate=5e-2, epochs=20, minibatch_size=16, target_kl=1e-3, value_clip=0.2)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg)
    batch, _ = _fixed_batch(model)
    m = ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False)
    assert 1 <= m["minibatches"] < 20 * 6  # stopped early, after at least one step
    assert m["approx_kl"] > cfg.target_kl


def test_ppo_rejects_bad_batch():
    model = build_model(_TINY)
    cfg = PPOConfig()
    opt = make_optimizer(model, cfg)
    batch, _ = _fixed_batch(model, n=8)
    with pytest.raises(ValueError):
        ppo_update(model, opt, None, {k: v for k, v in batch.items() if k != "return"}, cfg, "cpu")
    bad = dict(batch)
    bad["advantage"] = bad["advantage"][:4]
    with pytest.raises(ValueError):
        ppo_update(model, opt, None, bad, cfg, "cpu")


def _train_from_seed(seed: int, updates: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(_TINY)
    cfg = PPOConfig(learning_rate=1e-3, epochs=2, minibatch_size=32, lr_schedule="cosine", lr_schedule_updates=5)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg)
    batch, _ = _fixed_batch(model, n=64, seed=1)
    for _ in range(updates):
        ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False)
    return [t.detach().clone() for t in model.state_dict().values()]


def test_training_reproducible_from_seed():
    a, b, c = _train_from_seed(7), _train_from_seed(7), _train_from_seed(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ppo_update_cuda_bf16():
    torch.manual_seed(0)
    model = build_model(_TINY)
    batch, _ = _fixed_batch(model)
    model.cuda()
    cfg = PPOConfig(epochs=2, minibatch_size=32)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg)
    m = ppo_update(model, opt, sch, batch, cfg, torch.device("cuda"), amp=True)
    assert math.isfinite(m["policy_loss"]) and m["minibatches"] >= 1


def test_model_is_the_same_function_in_training_and_inference_mode():
    """The behaviour policy (worker, inference) and the policy PPO trains must agree: with BatchNorm
    they did not (minibatch statistics), which stalled training with huge KL at the first step."""

    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=16, blocks=2, se=True, value_hidden=16))
    x = torch.randn(32, 46, 9, 9)
    model.train()
    full_logits, full_value = model(x)
    part_logits, part_value = model(x[5:9])  # a different minibatch must not change a position's output
    model.eval()
    with torch.inference_mode():
        eval_logits, eval_value = model(x)
    assert torch.allclose(full_logits[5:9], part_logits, atol=1e-5)
    assert torch.allclose(full_logits, eval_logits, atol=1e-5)
    assert torch.allclose(full_value, eval_value, atol=1e-6)


def test_importance_weights_are_one_when_behaviour_is_the_current_policy():
    torch.manual_seed(0)
    model = build_model(_TINY)
    cfg = PPOConfig(epochs=1, minibatch_size=32)
    batch, _ = _fixed_batch(model)  # sampled at temperature 1 by this very model
    m = ppo_update(model, make_optimizer(model, cfg), None, batch, cfg, "cpu", amp=False)
    assert m["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["is_weight_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["is_weight_truncated"] == 0.0
    assert m["approx_kl_behaviour"] == pytest.approx(0.0, abs=1e-6)


def test_stale_positions_with_positive_advantage_still_teach():
    """Behaviour log-probs far below the current policy's (a lagged worker): the ratio to the
    behaviour policy starts outside the clip range, so a clip centred on it gives no gradient to
    positive advantages; decoupled PPO centres the clip on the proximal policy and keeps learning."""
    torch.manual_seed(0)
    model = build_model(_TINY)
    cfg = PPOConfig(learning_rate=3e-3, epochs=2, minibatch_size=32, target_kl=None, entropy_coef=0.0,
                    value_coef=0.0, normalize_advantages=False)
    batch, _ = _fixed_batch(model)
    batch["advantage"] = torch.ones_like(batch["advantage"])
    batch["log_prob"] = batch["log_prob"] - 2.0  # mu(a|s) = e^-2 pi(a|s): ratio to mu = 7.4 > 1 + eps
    before, _ = _eval(model, batch, batch["action"])
    m = ppo_update(model, make_optimizer(model, cfg), None, batch, cfg, "cpu", amp=False)
    after, _ = _eval(model, batch, batch["action"])
    assert m["is_weight_truncated"] == 1.0 and m["is_weight_max"] == pytest.approx(math.exp(2.0), rel=1e-4)
    assert after > before + 0.05, (before, after)


def test_a_non_finite_minibatch_is_skipped_not_stepped():
    torch.manual_seed(0)
    model = build_model(_TINY)
    cfg = PPOConfig(epochs=1, minibatch_size=96, target_kl=None)
    batch, _ = _fixed_batch(model)
    batch["return"] = batch["return"].clone()
    batch["return"][0] = float("nan")  # a poisoned target
    before = [p.detach().clone() for p in model.parameters()]
    m = ppo_update(model, make_optimizer(model, cfg), None, batch, cfg, "cpu", amp=False)
    assert m["nonfinite_minibatches"] == 1.0 and m["minibatches"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("target_kl, poison", [(None, False), (1e-3, False), (None, True)],
                         ids=["plain", "kl-stop", "non-finite"])
def test_decisions_on_the_device_give_the_same_update_as_on_the_host(target_kl, poison):
    """The GPU path takes the KL stop and the non-finite skip on the device (no host sync per
    minibatch, a skipped step through the fused optimiser's found_inf); run here on the CPU, it
    must give exactly the update the host-side decisions give."""
    results = []
    for on_device in (False, True):
        torch.manual_seed(0)
        model = build_model(_TINY)
        cfg = PPOConfig(learning_rate=5e-2, epochs=3, minibatch_size=16, target_kl=target_kl)
        opt = make_optimizer(model, cfg)
        sch = make_scheduler(opt, cfg)
        batch, _ = _fixed_batch(model)
        if poison:
            batch["return"] = batch["return"].clone()
            batch["return"][3] = float("nan")
        m = ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False, decide_on_device=on_device)
        results.append((m, [p.detach().clone() for p in model.parameters()], sch.last_epoch))
    (m_host, p_host, e_host), (m_dev, p_dev, e_dev) = results
    assert all(torch.equal(a, b) for a, b in zip(p_host, p_dev))
    assert e_host == e_dev
    for k, v in m_host.items():
        assert v == pytest.approx(m_dev[k], rel=1e-6, abs=1e-9, nan_ok=True), k
    if target_kl:
        assert 1 <= m_host["minibatches"] < 3 * 6
    if poison:
        assert m_host["nonfinite_minibatches"] == 3  # one poisoned minibatch in each of 3 epochs


def test_the_schedule_does_not_advance_on_an_update_that_took_no_step():
    torch.manual_seed(0)
    model = build_model(_TINY)
    cfg = PPOConfig(epochs=1, minibatch_size=96, lr_schedule="linear", lr_schedule_updates=10)
    opt, batch = make_optimizer(model, cfg), _fixed_batch(model)[0]
    sch = make_scheduler(opt, cfg)
    batch["return"] = batch["return"].clone()
    batch["return"][0] = float("nan")
    m = ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False)
    assert m["minibatches"] == 0 and sch.last_epoch == 0 and opt.param_groups[0]["lr"] == cfg.learning_rate
    batch["return"][0] = 0.0
    ppo_update(model, opt, sch, batch, cfg, "cpu", amp=False)
    assert sch.last_epoch == 1 and opt.param_groups[0]["lr"] < cfg.learning_rate


def test_a_restored_optimiser_takes_the_configured_learning_rate():
    """--resume with a changed ppo.learning_rate: the new rate, at the schedule's position."""
    from keisei_stream.rl.ppo import apply_config

    torch.manual_seed(0)
    model = build_model(_TINY)
    old = PPOConfig(learning_rate=1e-3, lr_schedule="linear", lr_schedule_updates=10, lr_final_fraction=0.5)
    opt = make_optimizer(model, old)
    sch = make_scheduler(opt, old)
    for _ in range(4):
        ppo_update(model, opt, sch, _fixed_batch(model)[0], old, "cpu", amp=False)
    state = (opt.state_dict(), sch.state_dict())
    new = old.model_copy(update={"learning_rate": 4e-3})
    opt2 = make_optimizer(model, new)
    sch2 = make_scheduler(opt2, new)
    opt2.load_state_dict(state[0])
    sch2.load_state_dict(state[1])
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(4, old))  # the checkpoint's rate
    apply_config(opt2, sch2, new)
    assert opt2.param_groups[0]["lr"] == pytest.approx(4e-3 * lr_factor(4, new))
    ppo_update(model, opt2, sch2, _fixed_batch(model)[0], new, "cpu", amp=False)  # the fused step still works
    assert opt2.param_groups[0]["lr"] == pytest.approx(4e-3 * lr_factor(5, new))
