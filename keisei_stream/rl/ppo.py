"""PPO for two-player zero-sum self-play: GAE with the per-ply sign flip, and the clipped update.

Sources:

* PPO: Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization
  Algorithms", arXiv:1707.06347 (clipped surrogate, eq. 7; combined loss with value and entropy
  terms, eq. 9).
* GAE: Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", arXiv:1506.02438 (eqs. 11-16).
* Approximate KL ``E[(r - 1) - log r]`` with ``r = p/q``: J. Schulman, "Approximating KL
  Divergence", http://joschu.net/blog/kl-approx.html (the unbiased, always non-negative "k3").
* Value clipping, advantage normalisation, Adam epsilon 1e-5, gradient-norm clipping: as in the
  OpenAI baselines PPO2 implementation, see Huang et al. 2022, "The 37 Implementation Details of
  Proximal Policy Optimization" (ICLR blog track), details 5-11.
* Decoupled PPO: Hilton, Cobbe, Schulman 2021, "Batch size-invariance for policy optimization",
  arXiv:2110.00641 (the clip centred on the proximal policy, the behaviour policy only in an
  importance weight), truncated as in IMPALA, Espeholt et al. 2018, arXiv:1802.01561.
* AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
  Biases and normalisation parameters are not decayed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from keisei_stream.config import PPOConfig
from keisei_stream.rl import distributed
from keisei_stream.rl.policy import log_prob_entropy

BATCH_KEYS = ("obs", "mask", "action", "log_prob", "value", "advantage", "return")


# ----------------------------------------------------------------------------------------------
# Self-play GAE
# ----------------------------------------------------------------------------------------------
def compute_gae(
    values: np.ndarray,
    game_offsets: np.ndarray,
    final_rewards: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over whole self-play games with the zero-sum sign flip between plies.

    Positions ``t = 0..T-1`` of one game alternate movers and every value is from the mover's
    point of view, so the opponent's value enters with a minus sign (negamax form of GAE,
    Schulman et al. 2016, arXiv:1506.02438):

    * ``delta_t = r_t - gamma * V_{t+1} - V_t`` for ``t < T-1`` (``r_t = 0`` there),
    * ``delta_{T-1} = r_final - V_{T-1}`` (no bootstrap past the end of a game),
    * ``A_t = delta_t - gamma * lam * A_{t+1}``, ``A_{T-1} = delta_{T-1}``,
    * ``returns = A + V``.

    A game cut at ``max_plies`` is a draw: its final reward is 0 and nothing is bootstrapped.
    Games never bootstrap into each other. The recursion is a backward scan over "plies from the
    end" run for all games at once (one vectorised step per ply of the longest game).

    Args:
        values: ``(P,)`` float behaviour values ``V_t`` in game order.
        game_offsets: ``(G+1,)`` int, ``game_offsets[0] == 0``, non-decreasing,
            ``game_offsets[-1] == P``; game ``g`` holds positions ``offsets[g]:offsets[g+1]``.
        final_rewards: ``(G,)`` float, reward of the last mover of each game (+1 won, -1 lost,
            0 draw / max plies).
        gamma: discount per ply, in (0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        ``(advantages (P,) float32, returns (P,) float32)``, each from its position's mover's view.

    Raises:
        ValueError: inconsistent shapes or offsets.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    off = np.asarray(game_offsets, dtype=np.int64).reshape(-1)
    fr = np.asarray(final_rewards, dtype=np.float64).reshape(-1)
    p = v.shape[0]
    if off.shape[0] < 1 or off[0] != 0 or off[-1] != p or np.any(np.diff(off) < 0):
        raise ValueError(f"game_offsets must start at 0, be non-decreasing and end at {p}")
    if fr.shape[0] != off.shape[0] - 1:
        raise ValueError(f"final_rewards has {fr.shape[0]} games, offsets describe {off.shape[0] - 1}")
    if p == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    lengths = np.diff(off)
    game = np.repeat(np.arange(lengths.shape[0]), lengths)  # (P,) game of each position
    from_end = off[1:][game] - 1 - np.arange(p)  # (P,) 0 for the last position of its game
    last = from_end == 0
    v_next = np.zeros(p)
    v_next[:-1] = v[1:]
    delta = np.where(last, fr[game] - v, -gamma * v_next - v)
    # Backward scan: positions with from_end == k depend on their successor (from_end == k - 1).
    adv = np.empty(p)
    order = np.argsort(from_end, kind="stable")
    counts = np.bincount(from_end)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    idx = order[bounds[0]:bounds[1]]
    adv[idx] = delta[idx]
    coef = gamma * lam
    for k in range(1, counts.shape[0]):
        idx = order[bounds[k]:bounds[k + 1]]
        adv[idx] = delta[idx] - coef * adv[idx + 1]
    return adv.astype(np.float32), (adv + v).astype(np.float32)


def filter_stale(versions: np.ndarray, current_version: int, max_policy_lag: int) -> np.ndarray:
    """Which positions are fresh enough to train on.

    Args:
        versions: ``(P,)`` int model version that chose each position's move.
        current_version: the learner's current (latest published) version.
        max_policy_lag: keep positions with ``current_version - version <= max_policy_lag``.

    Returns:
        ``(P,)`` bool keep-mask. Versions newer than ``current_version`` (negative lag) are kept.
    """
    lag = int(current_version) - np.asarray(versions, dtype=np.int64)
    return lag <= int(max_policy_lag)


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: PPOConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with ``cfg.learning_rate``, eps 1e-5 and
    ``cfg.weight_decay`` on weight matrices / conv kernels only (biases and normalisation weights excluded).

    Create it after moving the model to its device.
    """
    decay, no_decay = [], []
    for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=1e-5)


def lr_factor(update: int, cfg: PPOConfig) -> float:
    """Learning-rate multiplier after ``update`` updates.

    ``constant``: 1. ``linear``: from 1 down to ``lr_final_fraction`` over ``lr_schedule_updates``,
    then flat. ``cosine``: ``f + (1 - f) * (1 + cos(pi * u / U)) / 2`` (Loshchilov & Hutter 2017,
    SGDR, arXiv:1608.03983, without restarts), then flat at ``f``.
    """
    if cfg.lr_schedule == "constant":
        return 1.0
    frac = min(max(update, 0) / cfg.lr_schedule_updates, 1.0)
    f = cfg.lr_final_fraction
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - f) * frac
    return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: PPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update LR schedule (:func:`lr_factor`); :func:`ppo_update` steps it once per update.

    Its ``state_dict()`` holds only numbers, so it checkpoints with ``weights_only`` loading.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, cfg))


# ----------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------
def _variance_sums(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """``[n, sum(t), sum(t^2), sum(t-p), sum((t-p)^2)]`` (float64): explained variance from sums
    that add up over ranks."""
    t, e = target.double(), (target - pred).double()
    return [float(t.numel()), float(t.sum()), float((t * t).sum()), float(e.sum()), float((e * e).sum())]


def _explained_variance_from_sums(sums: list[float]) -> float:
    """``1 - Var(t - p) / Var(t)`` (population variances) from :func:`_variance_sums`; NaN when
    ``Var(t) == 0``."""
    n, st, st2, se, se2 = sums
    var_t = st2 / n - (st / n) ** 2 if n else 0.0
    if var_t <= 1e-12:
        return float("nan")
    return 1.0 - (se2 / n - (se / n) ** 2) / var_t


def _minibatches(sizes: list[int], rank: int, mb: int) -> tuple[list[int], list[int]]:
    """Split every rank's positions into the same number of minibatches.

    Args:
        sizes: positions held by each rank (``[n]`` on one rank). rank: this rank.
        mb: the global minibatch size (positions).

    Returns:
        ``(bounds, global_sizes)``: this rank's minibatch ``j`` is positions
        ``bounds[j]:bounds[j+1]`` of its shuffled batch; ``global_sizes[j]`` is minibatch ``j``'s
        size summed over all ranks. On one rank: consecutive slices of ``mb`` (the last shorter).
        On several: ``ceil(sum(sizes) / mb)`` minibatches, each rank's share split evenly (a
        rank may hold none of a minibatch).
    """
    if len(sizes) == 1:
        bounds = [*range(0, sizes[0], mb), sizes[0]]
        return bounds, [b - a for a, b in zip(bounds, bounds[1:])]
    k = max(1, math.ceil(sum(sizes) / mb))
    per_rank = [np.linspace(0, n, k + 1).round().astype(np.int64) for n in sizes]
    return per_rank[rank].tolist(), np.sum([np.diff(b) for b in per_rank], axis=0).tolist()


def _forward(model: nn.Module, obs: torch.Tensor, use_amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(obs)`` under bf16 autocast when ``use_amp`` (CUDA), as float32 ``(logits, value)``."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        logits, value = model(obs)
    return logits.float(), value.float()


def proximal_pass(
    model: nn.Module,
    obs: torch.Tensor,
    mask: torch.Tensor,
    actions: torch.Tensor,
    device: torch.device | str,
    amp: bool,
    minibatch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and values of ``model`` as it is now (the proximal policy of an update),
    without gradients, in slices of ``minibatch`` positions.

    Args:
        model: the actor-critic on ``device``. obs: ``(P, 46, 9, 9) float32``; mask ``(P, 13527)
        bool``; actions ``(P,) int64`` (any device: moved). amp: bf16 autocast on CUDA.

    Returns:
        ``(log_prob (P,) float32, value (P,) float32)`` on ``device``.
    """
    device = torch.device(device)
    use_amp = bool(amp) and device.type == "cuda"
    n = int(actions.shape[0])
    logp, values = torch.empty(n, device=device), torch.empty(n, device=device)
    with torch.no_grad():
        for s in range(0, n, max(1, minibatch)):
            idx = slice(s, min(s + minibatch, n))  # views, not gathered copies
            logits, values[idx] = _forward(model, obs[idx].to(device, torch.float32), use_amp)
            logp[idx], _ = log_prob_entropy(logits, mask[idx].to(device), actions[idx].to(device))
    return logp, values


def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    batch: dict[str, torch.Tensor],
    cfg: PPOConfig,
    device: torch.device | str,
    amp: bool = True,
) -> dict[str, float]:
    """One decoupled-PPO update: ``cfg.epochs`` passes of shuffled minibatches over ``batch``.

    The behaviour policy ``mu`` (the worker's, up to ``max_policy_lag`` versions old and possibly
    tempered) and the proximal policy ``pi_prox`` (this model at the start of the update) are
    decoupled as in Hilton, Cobbe, Schulman 2021, "Batch size-invariance for policy optimization",
    arXiv:2110.00641, eq. 2: the clip is centred on ``pi_prox``, and ``mu`` enters only through
    the importance weight ``w = pi_prox / mu``, truncated at ``cfg.is_weight_clip`` as IMPALA's
    ``rho_bar`` (Espeholt et al. 2018, arXiv:1802.01561, eq. 1). With fresh, untempered data
    ``w = 1`` and this is exactly PPO. Per minibatch (as a loss to minimise)::

        w       = min(exp(log pi_prox(a|s) - log mu(a|s)), is_weight_clip)   # constant
        ratio   = exp(log pi_theta(a|s) - log pi_prox(a|s))
        L_pi    = -mean(w * min(ratio * A, clip(ratio, 1-eps, 1+eps) * A))
        L_v     = 0.5 * mean((V - R)^2)                          # or the clipped form below
        L_v^clip= 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))
        loss    = L_pi + value_coef * L_v - entropy_coef * mean(H)

    Advantages are normalised once over the whole batch (``cfg.normalize_advantages``). Gradients
    are clipped to ``cfg.max_grad_norm``; the scheduler is stepped once at the end.

    Early stop (``cfg.target_kl``): before the epochs, one no-grad pass records the log-probs of
    the policy at the start of this update; before every optimiser step the approximate KL
    ``mean((r - 1) - log r)`` (joschu.net/blog/kl-approx.html) between that start policy and the
    current one on the minibatch is checked, and the update stops (without that step) once it
    exceeds ``target_kl``. Measuring from the start of the update rather than from the behaviour
    log-probs keeps stale data or a sampling temperature != 1 from stopping every update at once.

    Args:
        model: the actor-critic (possibly ``torch.compile``-d), already on ``device``; left in
            training mode.
        optimizer: from :func:`make_optimizer`. scheduler: from :func:`make_scheduler` or None.
        batch: CPU or device tensors: ``obs (P,46,9,9) float32``, ``mask (P,13527) bool``,
            ``action (P,) int64``, ``log_prob (P,) float32`` (behaviour, under the distribution
            sampled from), ``value (P,) float32`` (the values the advantages came from: the
            behaviour's, or the proximal pass's), ``advantage (P,) float32``, ``return (P,)
            float32``; optionally ``prox_log_prob (P,) float32``, the proximal policy's
            log-probabilities from the caller's :func:`proximal_pass` (then not computed again).
        cfg: PPO hyper-parameters. device: the model's device. amp: bf16 autocast on CUDA.

    Returns:
        Metrics (floats): ``policy_loss``, ``value_loss``, ``entropy`` (means over the minibatches
        stepped), ``approx_kl`` (start-of-update policy vs current, the last minibatch checked),
        ``approx_kl_behaviour`` (behaviour vs start-of-update policy: staleness/temperature),
        ``clip_fraction`` (share of ``ratio`` outside the clip range), ``is_weight_mean``,
        ``is_weight_max`` (before truncation) and ``is_weight_truncated`` (share of positions
        whose weight was cut at ``is_weight_clip``) over the whole batch,
        ``explained_variance`` (behaviour values vs returns), ``grad_norm``
        (mean pre-clip norm), ``learning_rate`` (used in this update), ``epochs_run`` (epochs
        begun), ``minibatches`` (optimiser steps taken), ``nonfinite_minibatches`` (minibatches whose
        loss or gradient norm was not finite: skipped, no step), ``samples`` (P).

    Raises:
        ValueError: missing keys, inconsistent lengths or an empty batch.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}")
    n = int(batch["action"].shape[0])
    for k in BATCH_KEYS:
        if int(batch[k].shape[0]) != n:
            raise ValueError(f"batch[{k!r}] has {batch[k].shape[0]} rows, expected {n}")
    world = distributed.world_size()
    sizes = distributed.all_gather_int(n)  # every rank's positions (one collective when distributed)
    total = sum(sizes)
    if total == 0:
        raise ValueError("empty batch")
    device = torch.device(device)
    nb = device.type == "cuda"
    obs = batch["obs"].to(device, torch.float32, non_blocking=nb)
    mask = batch["mask"].to(device, torch.bool, non_blocking=nb)
    actions = batch["action"].to(device, torch.int64, non_blocking=nb)
    old_logp = batch["log_prob"].to(device, torch.float32, non_blocking=nb)
    old_value = batch["value"].to(device, torch.float32, non_blocking=nb)
    returns = batch["return"].to(device, torch.float32, non_blocking=nb)
    adv = batch["advantage"].to(device, torch.float32, non_blocking=nb)
    if cfg.normalize_advantages and total > 1:
        if world == 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        else:  # over the whole distributed batch: the same normalisation as on one rank
            s1, s2 = distributed.all_reduce([float(adv.double().sum()), float((adv.double() ** 2).sum())])
            mean = s1 / total
            std = math.sqrt(max(s2 - total * mean * mean, 0.0) / (total - 1))
            adv = (adv - mean) / (std + 1e-8)
    use_amp = bool(amp) and device.type == "cuda"
    mb = min(cfg.minibatch_size, total)
    local_bounds, global_sizes = _minibatches(sizes, distributed.rank(), mb)

    model.train()
    # Log-probs of the proximal policy (this model before the update): the clip is centred on them,
    # the importance weight divides them by the behaviour policy, the KL early stop measures from them.
    if "prox_log_prob" in batch:  # the caller's proximal pass (it also recomputed the values)
        start_logp = batch["prox_log_prob"].to(device, torch.float32, non_blocking=nb)
    else:
        start_logp, _ = proximal_pass(model, obs, mask, actions, device, amp, mb)
    with torch.no_grad():
        lr_ = start_logp - old_logp
        is_weight_raw = lr_.exp()
        is_weight = is_weight_raw.clamp(max=cfg.is_weight_clip)
        # cut by more than float noise (1e-4 relative), so fresh data reports 0
        cut = is_weight_raw > cfg.is_weight_clip * (1 + 1e-4)
        kl_b, w_sum, w_cut = distributed.all_reduce([float(((is_weight_raw - 1) - lr_).sum()),
                                                     float(is_weight_raw.sum()), float(cut.sum())])
        (w_max,) = distributed.all_reduce([float(is_weight_raw.max()) if n else 0.0], op="max")
        is_stats = {"is_weight_mean": w_sum / total, "is_weight_max": w_max, "is_weight_truncated": w_cut / total}

    lr_now = float(optimizer.param_groups[0]["lr"])
    sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clip_fraction"), 0.0)  # over positions
    grad_norm_sum, stepped_positions, steps, skipped, epochs_run, approx_kl, stop = 0.0, 0, 0, 0, 0, 0.0, False
    for _ in range(cfg.epochs):
        epochs_run += 1
        perm = torch.randperm(n).to(device)
        for j, m_global in enumerate(global_sizes):
            idx = perm[local_bounds[j]:local_bounds[j + 1]]
            denom = m_global / world  # the rank-averaged gradient is the gradient of the global mean
            if idx.numel():
                logits, value = _forward(model, obs[idx], use_amp)
                logp, ent = log_prob_entropy(logits, mask[idx], actions[idx])
                with torch.no_grad():
                    d = logp - start_logp[idx]
                    kl_sum = float(((d.exp() - 1) - d).sum())
                ratio = torch.exp(logp - start_logp[idx])
                a = adv[idx]
                surrogate = torch.min(ratio * a, ratio.clamp(1.0 - cfg.clip_epsilon, 1.0 + cfg.clip_epsilon) * a)
                pg_i = -is_weight[idx] * surrogate
                ret = returns[idx]
                if cfg.value_clip is not None:
                    v_old = old_value[idx]
                    v_clipped = v_old + (value - v_old).clamp(-cfg.value_clip, cfg.value_clip)
                    v_i = 0.5 * torch.max((value - ret) ** 2, (v_clipped - ret) ** 2)
                else:
                    v_i = 0.5 * (value - ret) ** 2
                loss = (pg_i.sum() + cfg.value_coef * v_i.sum() - cfg.entropy_coef * ent.sum()) / denom
            else:  # this rank holds no position of this minibatch: a zero loss keeps DDP's collectives in step
                logits, value = model(obs.new_zeros((1, *obs.shape[1:])))
                loss, kl_sum = 0.0 * (logits.float().sum() + value.float().sum()), 0.0
            kl_all, bad = distributed.all_reduce([kl_sum, 0.0 if bool(torch.isfinite(loss)) else 1.0])
            approx_kl = kl_all / m_global
            if cfg.target_kl is not None and approx_kl > cfg.target_kl:
                stop = True
                break
            optimizer.zero_grad(set_to_none=True)
            if bad:  # a poisoned or degenerate minibatch on some rank: never let it reach the weights
                skipped += 1
                continue
            loss.backward()  # under DDP: gradients averaged over the ranks here
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(gn):  # the same averaged gradients on every rank: the same decision
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            steps += 1
            stepped_positions += m_global
            grad_norm_sum += float(gn)
            if idx.numel():
                with torch.no_grad():
                    sums["policy_loss"] += float(pg_i.sum())
                    sums["value_loss"] += float(v_i.sum())
                    sums["entropy"] += float(ent.sum())
                    sums["clip_fraction"] += float(((ratio - 1.0).abs() > cfg.clip_epsilon).sum())
        if stop:
            break
    if scheduler is not None:
        scheduler.step()
    totals = distributed.all_reduce([*sums.values(), *_variance_sums(old_value, returns)])
    metrics = {k: (v / stepped_positions if steps else float("nan")) for k, v in zip(sums, totals)}
    metrics.update({
        "grad_norm": grad_norm_sum / steps if steps else float("nan"),
        "approx_kl": approx_kl,
        "approx_kl_behaviour": kl_b / total,
        **is_stats,
        "explained_variance": _explained_variance_from_sums(totals[len(sums):]),
        "learning_rate": lr_now,
        "epochs_run": float(epochs_run),
        "minibatches": float(steps),
        "nonfinite_minibatches": float(skipped),
        "samples": float(total),
    })
    return metrics
