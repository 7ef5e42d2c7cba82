"""PPO for two-player zero-sum self-play: the optimiser, its schedule and one decoupled-PPO update.

Sources:

* PPO: Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization
  Algorithms", arXiv:1707.06347 (clipped surrogate, eq. 7; combined loss with value and entropy
  terms, eq. 9).
* Approximate KL ``E[(r - 1) - log r]`` with ``r = p/q``: J. Schulman, "Approximating KL
  Divergence", http://joschu.net/blog/kl-approx.html (the unbiased, always non-negative "k3").
* Value clipping, advantage normalisation, Adam epsilon 1e-5, gradient-norm clipping: as in the
  OpenAI baselines PPO2 implementation, see Huang et al. 2022, "The 37 Implementation Details of
  Proximal Policy Optimization" (ICLR blog track), details 5-11; the update reads top to bottom
  as CleanRL's ``ppo.py`` does.
* Decoupled PPO: Hilton, Cobbe, Schulman 2021, "Batch size-invariance for policy optimization",
  arXiv:2110.00641 (the clip centred on the proximal policy, the behaviour policy only in an
  importance weight), truncated as in IMPALA, Espeholt et al. 2018, arXiv:1802.01561.
* AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
  Biases and normalisation parameters are not decayed.

The loss of one minibatch (``ppo_update``), to minimise::

    w       = min(exp(log pi_prox(a|s) - log mu(a|s)), is_weight_clip)   # constant
    ratio   = exp(log pi_theta(a|s) - log pi_prox(a|s))
    L_pi    = -mean(w * min(ratio * A, clip(ratio, 1-eps, 1+eps) * A))
    L_v     = mean(value_loss(V, R, V_old, value_clip))
    loss    = L_pi + value_coef * L_v - entropy_coef * mean(H)

``mu`` is the behaviour policy (the worker's, up to ``max_policy_lag`` versions old, possibly
tempered), ``pi_prox`` the model at the start of the update; with fresh, untempered data ``w = 1``
and this is exactly PPO.

GAE and the staleness filter are in :mod:`keisei_stream.rl.gae`; the collectives that make several
learner ranks take one update are in :mod:`keisei_stream.rl.distributed` (the identity on one
process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from keisei_stream.config import PPOConfig
from keisei_stream.rl import distributed
from keisei_stream.rl.device import read_host, to_device
from keisei_stream.rl.policy import log_prob_entropy

BATCH_KEYS = ("obs", "mask", "action", "log_prob", "value", "advantage", "return")


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: PPOConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with ``cfg.learning_rate``, eps 1e-5 and
    ``cfg.weight_decay`` on weight matrices / conv kernels only (biases and normalisation weights
    excluded), fused (one kernel for all parameters; it also lets :func:`ppo_update` skip a step
    on the device, without asking the host, through ``found_inf``).

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
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=1e-5, fused=True)


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
    """Per-update LR schedule (:func:`lr_factor`); :func:`ppo_update` steps it once per update
    that took at least one optimiser step.

    Its ``state_dict()`` holds only numbers, so it checkpoints with ``weights_only`` loading.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, cfg))


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR | None,
                 cfg: PPOConfig) -> None:
    """Make a restored optimiser and schedule follow ``cfg``: the learning rate of the config (not
    the checkpoint's) at the schedule's current update, and the fused step (a checkpoint of
    another optimiser setting restores its own flags).

    Call after loading a checkpoint: ``--resume`` with a changed ``ppo.learning_rate`` uses the
    new rate. The schedule's position (updates made) is kept.
    """
    update = scheduler.last_epoch if scheduler is not None else 0
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = cfg.learning_rate * lr_factor(update, cfg)
    if scheduler is not None:
        scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports


# ----------------------------------------------------------------------------------------------
# Pieces of the update
# ----------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """The update's positions on the device (see :func:`ppo_update` for shapes and meaning)."""

    obs: torch.Tensor
    mask: torch.Tensor
    action: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor
    advantage: torch.Tensor
    returns: torch.Tensor
    prox_log_prob: torch.Tensor | None


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> _Batch:
    """Check the keys and lengths of ``batch`` and move it to ``device`` (non-blocking on CUDA).

    Raises:
        ValueError: missing keys or inconsistent lengths.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}")
    n = int(batch["action"].shape[0])
    for k in (*BATCH_KEYS, "prox_log_prob"):
        if k in batch and int(batch[k].shape[0]) != n:
            raise ValueError(f"batch[{k!r}] has {batch[k].shape[0]} rows, expected {n}")
    dtypes = {k: {"mask": torch.bool, "action": torch.int64}.get(k, torch.float32) for k in batch}
    host = {k: v for k, v in batch.items() if v.device != device}  # staged through pinned memory on CUDA
    on = {**{k: v.to(dtypes[k]) for k, v in batch.items() if k not in host}, **to_device(host, device, dtypes)}
    return _Batch(obs=on["obs"], mask=on["mask"], action=on["action"], log_prob=on["log_prob"],
                  value=on["value"], advantage=on["advantage"], returns=on["return"],
                  prox_log_prob=on.get("prox_log_prob"))


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
        model: the actor-critic on ``device``, the same module (compiled or not) as the update's
            ratio uses, so that ``pi_prox == mu`` at policy lag 0 up to rounding.
        obs: ``(P, 46, 9, 9) float32``; mask ``(P, 13527) bool``; actions ``(P,) int64`` (any
            device: moved). amp: bf16 autocast on CUDA.

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


def normalize_advantages(adv: torch.Tensor, total: int) -> torch.Tensor:
    """``(A - mean) / (std + 1e-8)`` over the whole update, every learner rank's positions
    included (``total`` of them; one collective when distributed); the sums stay on the device
    (float64), so the host never waits."""
    s1, s2 = distributed.all_reduce_([adv.double().sum(), (adv.double() ** 2).sum()], dtype=torch.float64)
    mean = s1 / total
    std = ((s2 - total * mean * mean).clamp(min=0.0) / (total - 1)).sqrt()
    return (adv - mean.to(adv.dtype)) / (std.to(adv.dtype) + 1e-8)


def importance_weights(prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, clip: float,
                       total: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The truncated importance weight ``w = min(pi_prox / mu, clip)`` per position, and its
    statistics over the whole update (``total`` positions on every rank; 0-d float64 tensors on
    the device, read with the update's other metrics): ``is_weight_mean``, ``is_weight_max``
    (before truncation), ``is_weight_truncated`` (share cut by more than float noise, 1e-4
    relative, so that fresh data reports 0) and ``approx_kl_behaviour`` (the k3 KL between the
    behaviour and the proximal policy: staleness and temperature)."""
    with torch.no_grad():
        log_w = prox_logp - behaviour_logp
        raw = log_w.exp()
        cut = raw > clip * (1 + 1e-4)
        kl_b, w_sum, w_cut = distributed.all_reduce_([((raw - 1) - log_w).double().sum(), raw.double().sum(),
                                                      cut.double().sum()], dtype=torch.float64)
        w_max = distributed.all_reduce_([raw.double().max() if raw.numel() else raw.new_zeros((), dtype=torch.float64)],
                                        op="max", dtype=torch.float64)[0]
    stats = {"is_weight_mean": w_sum / total, "is_weight_max": w_max, "is_weight_truncated": w_cut / total,
             "approx_kl_behaviour": kl_b / total}
    return raw.clamp(max=clip), stats


def value_loss(value: torch.Tensor, ret: torch.Tensor, old_value: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Per-position value loss ``0.5 (V - R)^2``, or with ``clip`` PPO2's clipped form
    ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` (Huang et al. 2022, detail 9)."""
    if clip is None:
        return 0.5 * (value - ret) ** 2
    v_clipped = old_value + (value - old_value).clamp(-clip, clip)
    return 0.5 * torch.max((value - ret) ** 2, (v_clipped - ret) ** 2)


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


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a bool tensor), decided on the device when the
    optimiser is fused (its ``found_inf`` input, the mechanism of ``torch.amp.GradScaler``: the
    step, the moments and the step count stay as they were), else on the host."""
    if optimizer.param_groups[0].get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32)
        optimizer.step()
        optimizer.found_inf = None
    elif not bool(skip):
        optimizer.step()


@dataclass
class _Sums:
    """Device-side sums over the stepped minibatches (read once, at the end of the update)."""

    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    positions: torch.Tensor
    grad_norm: torch.Tensor
    steps: torch.Tensor
    nonfinite: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "_Sums":
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in fields(cls)))

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, mbl: "_MinibatchLoss", m_global: int,
             cfg: PPOConfig, state: "_Stop", on_host: bool) -> bool:
        """Check the minibatch's KL and finiteness (over every rank), then backward, clip and step
        unless stopped or non-finite, and count it. Returns False when the update stops here
        (decided on the host; on the device the rest of the epoch runs without steps)."""
        checks = distributed.all_reduce_([mbl.kl_sum, (~torch.isfinite(mbl.loss.detach())).float()])
        stop = state.check(checks[0] / m_global)
        if on_host and bool(stop):
            return False
        optimizer.zero_grad(set_to_none=True)
        if on_host and bool(checks[1] > 0):  # a poisoned or degenerate minibatch on some rank
            self.nonfinite += 1
            return True
        mbl.loss.backward()  # under DDP: gradients averaged over the ranks here
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        bad = ~torch.isfinite(grad_norm) | (checks[1] > 0)  # the same averaged gradients on every rank
        _step_unless(optimizer, stop | bad)
        self.add(stop | bad, bad & ~stop, m_global, grad_norm, mbl)
        return True

    def add(self, skipped: torch.Tensor, nonfinite: torch.Tensor, m_global: int, grad_norm: torch.Tensor,
            mbl: "_MinibatchLoss") -> None:
        """Count one minibatch: its sums when it was stepped (``skipped`` false), else only
        whether it was ``nonfinite``. Bool tensors in, no host synchronisation."""
        zero = torch.zeros((), dtype=torch.float64, device=skipped.device)

        def took(x: torch.Tensor) -> torch.Tensor:  # where(), not a product: a skipped sum may be NaN
            return torch.where(skipped, zero, x.double())

        self.nonfinite += nonfinite.double()
        self.steps += took(torch.ones_like(zero))
        self.positions += took(torch.full_like(zero, m_global))
        self.grad_norm += took(grad_norm)
        self.policy_loss += took(mbl.policy_loss)
        self.value_loss += took(mbl.value_loss)
        self.entropy += took(mbl.entropy)
        self.clip_fraction += took(mbl.clipped)

    def metrics(self, b: _Batch, total: int, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        """The update's loss metrics over every rank (means over the positions stepped), the
        explained variance of ``b``'s values, ``grad_norm``, ``minibatches`` (steps),
        ``nonfinite_minibatches`` and ``samples``, plus ``extra`` (name -> 0-d device tensor,
        already reduced over the ranks): reduced on the device and read in **the one host
        synchronisation** of the update (:func:`~keisei_stream.rl.device.read_host`)."""
        sums = [getattr(self, f.name) for f in fields(self)]
        n_local = len(sums) - 4  # the loss sums; positions, grad_norm, steps, nonfinite agree on every rank
        reduced = distributed.all_reduce_([*sums[:n_local], *_variance_sums(b.value, b.returns)], dtype=torch.float64)
        own = torch.stack(sums[n_local:])
        names = list(extra)
        values = read_host(torch.cat([reduced, own, torch.stack([extra[k].double() for k in names])
                                      if names else own.new_zeros(0)]))
        totals, (positions, grad_norm, steps, nonfinite) = values[:len(reduced)], values[len(reduced):len(reduced) + 4]
        out = {k: (v / positions if steps else float("nan"))
               for k, v in zip(("policy_loss", "value_loss", "entropy", "clip_fraction"), totals)}
        out.update({"grad_norm": grad_norm / steps if steps else float("nan"),
                    "explained_variance": _explained_variance_from_sums(totals[n_local:]), "minibatches": float(steps),
                    "nonfinite_minibatches": float(nonfinite), "samples": float(total)})
        out.update(zip(names, values[len(reduced) + 4:]))
        return out


@dataclass
class _Stop:
    """The KL early stop, on the device: ``stopped`` once a minibatch's KL passed ``target_kl``;
    ``approx_kl`` the KL of the last minibatch checked before that."""

    target_kl: float
    stopped: torch.Tensor
    approx_kl: torch.Tensor

    def check(self, kl: torch.Tensor) -> torch.Tensor:
        self.approx_kl = torch.where(self.stopped, self.approx_kl, kl)
        self.stopped = self.stopped | (kl > self.target_kl)
        return self.stopped


class _StopPoll:
    """The KL stop read back on the host **without waiting** for the device (CUDA): after each
    minibatch the device's stop flag is copied into pinned memory behind an event; before the next
    minibatch the flags whose events have completed (``Event.query()``, which never blocks) are
    looked at. Once one says stopped, the rest of the update's minibatches are not launched. The
    host runs ahead of the device by the launch queue's depth, so a few minibatches past the stop
    may still run (their optimiser steps suppressed on the device, so the update is the same);
    :meth:`after_stop` counts them."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.flags = torch.zeros(max(1, capacity), dtype=torch.bool, pin_memory=True)
        self.events: list[torch.cuda.Event] = []
        self.seen = 0
        self.first_stopped: int | None = None

    def record(self, stopped: torch.Tensor) -> None:
        """Copy ``stopped`` (0-d bool on the device) behind the work launched so far."""
        i = len(self.events)
        self.flags[i].copy_(stopped, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events.append(event)

    def stopped(self) -> bool:
        """True once a completed copy says stopped (never blocks)."""
        while self.first_stopped is None and self.seen < len(self.events) and self.events[self.seen].query():
            if bool(self.flags[self.seen]):  # pinned host memory, written: no device access
                self.first_stopped = self.seen
            self.seen += 1
        return self.first_stopped is not None

    def after_stop(self) -> int:
        """Minibatches launched after the one that stopped the update (their work ran without a
        step), as far as the host has seen by now."""
        return 0 if self.first_stopped is None else len(self.events) - 1 - self.first_stopped


@dataclass
class _MinibatchLoss:
    """One minibatch's loss (scaled for the ranks' average) and its sums for the metrics (float64,
    detached): per-position policy and value losses, entropy, positions clipped, and the k3 KL sum."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    clipped: torch.Tensor
    kl_sum: torch.Tensor


def _minibatch_loss(model: nn.Module, b: _Batch, idx: torch.Tensor, prox_logp: torch.Tensor, weight: torch.Tensor,
                    adv: torch.Tensor, cfg: PPOConfig, use_amp: bool, scale: float) -> _MinibatchLoss:
    """The decoupled-PPO loss of positions ``idx`` times ``scale`` (see :func:`ppo_update`); a rank
    holding none of the minibatch runs the model on one zero input with a zero loss, so that
    ``DistributedDataParallel``'s collectives stay in step."""
    if not idx.numel():
        logits, value = model(b.obs.new_zeros((1, *b.obs.shape[1:])))
        zero = 0.0 * (logits.float().sum() + value.float().sum())
        nothing = zero.detach().double()
        return _MinibatchLoss(zero, nothing, nothing, nothing, nothing, nothing.float())
    logits, value = _forward(model, b.obs[idx], use_amp)
    logp, entropy = log_prob_entropy(logits, b.mask[idx], b.action[idx])
    log_ratio = logp - prox_logp[idx]
    ratio = log_ratio.exp()
    a = adv[idx]
    pg = -weight[idx] * torch.min(ratio * a, ratio.clamp(1.0 - cfg.clip_epsilon, 1.0 + cfg.clip_epsilon) * a)
    vl = value_loss(value, b.returns[idx], b.value[idx], cfg.value_clip)
    loss = (pg.sum() + cfg.value_coef * vl.sum() - cfg.entropy_coef * entropy.sum()) * scale
    with torch.no_grad():
        return _MinibatchLoss(loss, pg.double().sum(), vl.double().sum(), entropy.double().sum(),
                              ((ratio - 1.0).abs() > cfg.clip_epsilon).double().sum(),
                              ((ratio - 1) - log_ratio).sum())


# ----------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------
def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    batch: dict[str, torch.Tensor],
    cfg: PPOConfig,
    device: torch.device | str,
    amp: bool = True,
    decide_on_device: bool | None = None,
    extra_metrics: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """One decoupled-PPO update: ``cfg.epochs`` passes of shuffled minibatches over ``batch``.

    The loss (module docstring; Hilton et al. 2021 with IMPALA's truncation): the clip is centred
    on the proximal policy (this model at the start of the update) and the behaviour policy enters
    only through the truncated importance weight (:func:`importance_weights`); plus the value loss
    (:func:`value_loss`) and the entropy bonus. Advantages are normalised once over the whole
    batch; gradients are clipped to ``cfg.max_grad_norm``; the scheduler steps once, if a step was
    taken. Before every step the k3 KL between the proximal and the current policy is checked and
    the update stops at ``cfg.target_kl``; a minibatch with a non-finite loss or gradient is
    skipped. Both decisions are taken on the device on a GPU, where the host learns of a stop
    without waiting (:class:`_StopPoll`) and launches no more minibatches once it has. With
    several learner ranks each rank's loss is scaled so that DDP's average is the gradient of the
    whole distributed minibatch, and every decision and metric is reduced over the ranks.

    Args:
        model: the actor-critic (possibly compiled or DDP-wrapped) on ``device``; left in training mode.
        optimizer: from :func:`make_optimizer`. scheduler: from :func:`make_scheduler` or None.
        batch: CPU or device tensors: ``obs (P,46,9,9) float32``, ``mask (P,13527) bool``,
            ``action (P,) int64``, ``log_prob (P,) float32`` (behaviour), ``value (P,) float32`` (the
            values the advantages came from), ``advantage (P,) float32``, ``return (P,) float32``;
            optionally ``prox_log_prob (P,) float32`` from the caller's :func:`proximal_pass`.
        cfg: PPO hyper-parameters. device: the model's device. amp: bf16 autocast on CUDA.
        decide_on_device: take the stop and skip decisions on the device (default: on CUDA only;
            both ways give the same update).
        extra_metrics: the caller's own 0-d device tensors (name -> tensor), read with the
            update's metrics in its one host synchronisation and returned among them.

    Returns:
        Metrics (floats): ``policy_loss``, ``value_loss``, ``entropy``, ``clip_fraction`` (means
        over the positions stepped), ``approx_kl`` (the last minibatch checked), the statistics of
        :func:`importance_weights`, ``explained_variance``, ``grad_norm`` (mean, before clipping),
        ``learning_rate``, ``epochs_run``, ``minibatches`` (steps), ``nonfinite_minibatches``,
        ``samples`` (P over all ranks); on CUDA ``minibatches_after_stop`` (launched after a KL
        stop before the host saw it: their work ran, without a step). On a GPU the host never
        waits for the device before the metrics are read (once, at the end).

    Raises:
        ValueError: missing keys, inconsistent lengths or an empty batch (on every rank).
    """
    device = torch.device(device)
    b = _to_device(batch, device)
    n = int(b.action.shape[0])
    sizes = distributed.all_gather_int(n)  # every rank's positions
    total, world = sum(sizes), len(sizes)
    if total == 0:
        raise ValueError("empty batch")
    use_amp = bool(amp) and device.type == "cuda"
    on_host = device.type != "cuda" if decide_on_device is None else not decide_on_device
    mb = min(cfg.minibatch_size, total)
    bounds, global_sizes = _minibatches(sizes, distributed.rank(), mb)
    adv = normalize_advantages(b.advantage, total) if cfg.normalize_advantages and total > 1 else b.advantage
    model.train()
    prox_logp = b.prox_log_prob if b.prox_log_prob is not None else \
        proximal_pass(model, b.obs, b.mask, b.action, device, amp, mb)[0]
    weight, is_stats = importance_weights(prox_logp, b.log_prob, cfg.is_weight_clip, total)
    lr_now = float(optimizer.param_groups[0]["lr"])

    sums = _Sums.zeros(device)
    stop = _Stop(math.inf if cfg.target_kl is None else cfg.target_kl, torch.zeros((), dtype=torch.bool, device=device),
                 torch.zeros((), device=device))
    # one rank: the host polls the stop without waiting. Several ranks must launch the same minibatches
    # (DDP's collectives), and their hosts see the device at different times: they read the
    # (reduced) flag once per epoch instead, a wait per epoch.
    poll = _StopPoll(device, cfg.epochs * len(global_sizes)) if device.type == "cuda" and not on_host and world == 1 \
        else None
    epochs_run = torch.zeros((), dtype=torch.float64, device=device)  # epochs begun before the stop
    for _ in range(cfg.epochs):
        epochs_run += (~stop.stopped).double()
        # on CUDA a device-side shuffle (sorting random keys) that no implementation can route through the host
        perm = torch.rand(n, device=device).argsort() if device.type == "cuda" else torch.randperm(n)
        for j, m_global in enumerate(global_sizes):
            if poll is not None and poll.stopped():  # the stop seen without waiting: skip the rest
                break
            mbl = _minibatch_loss(model, b, perm[bounds[j]:bounds[j + 1]], prox_logp, weight, adv, cfg, use_amp,
                                  world / m_global)
            if not sums.step(model, optimizer, mbl, m_global, cfg, stop, on_host):
                break
            if poll is not None:
                poll.record(stop.stopped)
        # the host decides at once (above); on one CUDA rank the poll decides without waiting; on the
        # CPU with the decisions on the device, reading the flag costs nothing; several CUDA ranks wait here
        if poll.stopped() if poll is not None else bool(stop.stopped):
            break

    metrics = sums.metrics(b, total, {"approx_kl": stop.approx_kl, "epochs_run": epochs_run, **is_stats,
                                      **(extra_metrics or {})})
    if scheduler is not None and metrics["minibatches"] > 0:
        scheduler.step()
    metrics["learning_rate"] = lr_now
    if poll is not None:
        metrics["minibatches_after_stop"] = float(poll.after_stop())
    return metrics


def _variance_sums(pred: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """``[n, sum(t), sum(t^2), sum(t-p), sum((t-p)^2)]`` (0-d float64 tensors on the device):
    explained variance from sums that add up over ranks."""
    t, e = target.double(), (target - pred).double()
    return [torch.full((), float(t.numel()), dtype=torch.float64, device=t.device), t.sum(), (t * t).sum(), e.sum(),
            (e * e).sum()]


def _explained_variance_from_sums(sums: list[float]) -> float:
    """``1 - Var(t - p) / Var(t)`` (population variances) from :func:`_variance_sums`; NaN when
    ``Var(t) == 0``."""
    n, st, st2, se, se2 = sums
    var_t = st2 / n - (st / n) ** 2 if n else 0.0
    if var_t <= 1e-12:
        return float("nan")
    return 1.0 - (se2 / n - (se / n) ** 2) / var_t
