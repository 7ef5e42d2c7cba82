"""Masked categorical policy over the 13,527 actions.

Illegal actions get exactly zero probability: their logits are replaced by :data:`MASK_VALUE`
(a large negative *finite* number, so a softmax never produces NaN and ``0 * log 0`` terms vanish),
sampling only ever looks at legal entries, and the entropy sums over legal actions only.

Which distribution a log-probability refers to:

* :func:`sample_actions` / :func:`act` return the log-probability of the sampled action under the
  distribution it was actually drawn from, ``softmax(masked_logits / temperature)``. This is the
  behaviour log-probability PPO needs for its importance ratio ``pi_theta(a|s) / mu(a|s)``; with
  ``temperature != 1`` the ratio then corrects from the tempered behaviour policy ``mu`` towards the
  model's own (temperature 1) policy. ``temperature == 0`` means argmax; the point-mass
  distribution gives log-probability 0.
* :func:`log_prob_entropy` (training) uses the model's policy, ``softmax(masked_logits)``
  (temperature 1).

Sampling uses the Gumbel-max trick restricted to the legal entries (Gumbel 1954; see e.g.
Maddison et al. 2014, "A* Sampling", arXiv:1411.0030): ``argmax_a (logit_a / T + g_a)`` with
``g_a = -log(-log U_a)`` i.i.d. standard Gumbel is an exact sample of ``softmax(logits / T)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MASK_VALUE = -1.0e9
"""Logit given to illegal actions (finite, so softmax/log_softmax stay NaN-free)."""


def _check(logits: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.dim() != 2 or mask.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} must both be (B, A)")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits with illegal actions set to :data:`MASK_VALUE`.

    Args:
        logits: ``(B, A)`` float logits.
        mask: ``(B, A)`` bool, True = legal.

    Returns:
        ``(B, A)`` float32 logits.

    Raises:
        ValueError: shape or dtype mismatch.
    """
    _check(logits, mask)
    return torch.where(mask, logits.float(), torch.full((), MASK_VALUE, device=logits.device))


def _require_legal(mask: torch.Tensor) -> None:
    if mask.shape[0] and not bool(mask.any(dim=1).all()):
        raise ValueError("a row of the mask has no legal action")


def greedy_actions(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Most probable legal action per row (evaluation play).

    Args:
        logits: ``(B, A)`` float; mask: ``(B, A)`` bool, every row with at least one legal action.

    Returns:
        ``(B,)`` int64 action indices.

    Raises:
        ValueError: shape/dtype mismatch or a row without legal actions.
    """
    _check(logits, mask)
    _require_legal(mask)
    return masked_logits(logits, mask).argmax(dim=1)


def sample_actions(
    logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
    dense: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one legal action per row from ``softmax(masked_logits / temperature)``.

    On the CPU the noise is drawn for the legal entries only (``mask.nonzero()``); on a GPU
    (``dense``, default: when the logits are on CUDA) over the dense ``(B, A)`` logits, because
    ``nonzero`` makes the host wait for the device: the same distribution, and for the same noise
    the same actions and log-probabilities. The dense path does not check for rows without a
    legal action (that check would wait for the device too).

    Args:
        logits: ``(B, A)`` float raw logits.
        mask: ``(B, A)`` bool, True = legal; every row needs at least one legal action.
        temperature: > 0 samples from the tempered distribution; 0 takes the argmax.
        generator: optional ``torch.Generator`` for reproducible draws (may live on another device
            than ``logits``; the uniform numbers are drawn on the generator's device).
        uniform: optional ``(B, A)`` uniform noise in (0, 1) to use instead of drawing it (the
            sparse path reads its legal entries): both paths given the same noise sample the same
            actions.
        dense: the dense path (default: on CUDA).

    Returns:
        ``(actions (B,) int64, log_prob (B,) float32)`` where ``log_prob`` is the log-probability of
        each action under the distribution it was sampled from (tempered; 0 for argmax).

    Raises:
        ValueError: shape/dtype mismatch, negative temperature, or a row without legal actions.
    """
    _check(logits, mask)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if logits.is_cuda if dense is None else dense:
        return _sample_dense(logits, mask, temperature, generator, uniform)
    _require_legal(mask)
    b = logits.shape[0]
    if temperature == 0:
        return greedy_actions(logits, mask), torch.zeros(b, dtype=torch.float32, device=logits.device)
    # Work on the legal entries only: O(legal moves) instead of O(B * 13527) after the nonzero().
    rows, cols = mask.nonzero(as_tuple=True)
    vals = logits[rows, cols].float() / float(temperature)
    if uniform is None:
        gen_device = generator.device if generator is not None else logits.device
        u = torch.rand(rows.shape[0], generator=generator, device=gen_device).to(logits.device)
    else:
        u = uniform[rows, cols].float()
    u = u.clamp(min=torch.finfo(torch.float32).tiny)
    z = vals - torch.log(-torch.log(u))
    neg_inf = torch.full((b,), float("-inf"), device=logits.device)
    best = neg_inf.scatter_reduce(0, rows, z, "amax")
    win = z == best[rows]  # exactly one winner per row except for measure-zero ties (any is legal)
    actions = torch.zeros(b, dtype=torch.int64, device=logits.device).scatter_(0, rows[win], cols[win])
    # log softmax over the legal entries: vals[a] - logsumexp(vals of the row)
    vmax = neg_inf.scatter_reduce(0, rows, vals, "amax")
    sumexp = torch.zeros(b, device=logits.device).index_add_(0, rows, torch.exp(vals - vmax[rows]))
    chosen = logits.gather(1, actions[:, None]).squeeze(1).float() / float(temperature)
    log_prob = chosen - vmax - torch.log(sumexp)
    return actions, log_prob


def _sample_dense(logits: torch.Tensor, mask: torch.Tensor, temperature: float, generator: torch.Generator | None,
                  uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_actions`' dense path (Gumbel-max over every entry, illegal ones excluded):
    no host synchronisation; ``generator`` on the logits' device."""
    masked = masked_logits(logits, mask)
    if temperature == 0:
        return masked.argmax(dim=1), torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    tempered = masked / float(temperature)
    if uniform is None:
        uniform = torch.rand(tempered.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.float().clamp(min=torch.finfo(torch.float32).tiny)))
    actions = torch.where(mask, tempered + gumbel, torch.full((), -torch.inf, device=logits.device)).argmax(dim=1)
    log_prob = torch.log_softmax(tempered, dim=1).gather(1, actions[:, None]).squeeze(1)
    return actions, log_prob


def log_prob_entropy(
    logits: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor, dense: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``actions`` and entropies under the masked temperature-1 policy.

    On the CPU computed on the legal entries only (a per-row log-sum-exp over ``mask.nonzero()``),
    which is ~15x cheaper than dense ``(B, 13527)`` softmax arithmetic when a few dozen moves are
    legal; on a GPU (``dense``, default: when the logits are on CUDA) densely, because ``nonzero``
    makes the host wait for the device and the dense arithmetic is cheap there: the same values.
    Gradients flow to the legal logits only.

    Args:
        logits: ``(B, A)`` float raw logits (gradients flow through).
        mask: ``(B, A)`` bool legal actions (each row should have one).
        actions: ``(B,)`` int action indices; an illegal one gets :data:`MASK_VALUE`.
        dense: the dense path (default: on CUDA).

    Returns:
        ``(log_prob (B,) float32, entropy (B,) float32)``; the entropy (nats) counts legal actions
        only, so uniform logits over k legal actions give ``log k``.

    Raises:
        ValueError: shape or dtype mismatch.
    """
    _check(logits, mask)
    if logits.is_cuda if dense is None else dense:
        return _log_prob_entropy_dense(logits, mask, actions)
    b = logits.shape[0]
    rows, cols = mask.nonzero(as_tuple=True)
    vals = logits[rows, cols].float()
    neg_inf = torch.full((b,), float("-inf"), device=logits.device)
    vmax = neg_inf.scatter_reduce(0, rows, vals.detach(), "amax")  # shift only: no gradient needed
    sumexp = torch.zeros(b, device=logits.device).index_add(0, rows, torch.exp(vals - vmax[rows]))
    log_z = torch.log(sumexp) + vmax
    logp_legal = vals - log_z[rows]
    entropy = -torch.zeros(b, device=logits.device).index_add(0, rows, logp_legal.exp() * logp_legal)
    a = actions.long()[:, None]
    legal = mask.gather(1, a).squeeze(1)
    chosen = logits.gather(1, a).squeeze(1).float() - log_z
    log_prob = torch.where(legal, chosen, torch.full((), MASK_VALUE, device=logits.device))
    return log_prob, entropy


def _log_prob_entropy_dense(
    logits: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`log_prob_entropy`'s dense path: no host synchronisation. Illegal entries have
    probability exactly 0 (their logit is :data:`MASK_VALUE`) and add nothing to the entropy."""
    logp_all = torch.log_softmax(masked_logits(logits, mask), dim=1)
    p_all = logp_all.exp()
    entropy = -torch.where(mask, p_all * logp_all, torch.zeros((), device=logits.device)).sum(dim=1)
    a = actions.long()[:, None]
    legal = mask.gather(1, a).squeeze(1)
    log_prob = torch.where(legal, logp_all.gather(1, a).squeeze(1), torch.full((), MASK_VALUE, device=logits.device))
    return log_prob, entropy


def act(
    model: nn.Module,
    obs: np.ndarray,
    mask: np.ndarray,
    temperature: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One forward pass and one move per position: the self-play worker's step.

    Runs under ``torch.inference_mode``. The model computes the same function in training and
    inference mode (GroupNorm), so behaviour log-probs match what the learner recomputes.

    Args:
        model: an :class:`keisei_stream.rl.model.ActorCritic` (or compiled wrapper).
        obs: ``(N, 46, 9, 9)`` float32 observations.
        mask: ``(N, 13527)`` bool legal-action masks (each row with a legal action).
        temperature: sampling temperature (> 0), or 0 for argmax.
        device: where to run; None = the device of the model's parameters.
        generator: optional ``torch.Generator`` for the sampling noise.
        amp: bf16 autocast when the device is CUDA (ignored on CPU).

    Returns:
        ``(actions (N,) int64, log_prob (N,) float32, value (N,) float32)`` NumPy arrays; ``log_prob``
        is under the distribution actually sampled from (see the module docstring), ``value`` in
        [-1, 1] from the side to move's view.

    Raises:
        ValueError: bad shapes, or a position without legal actions.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32)).to(device, non_blocking=True)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.bool_)).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits, value = model(x)
        actions, log_prob = sample_actions(logits.float(), m, temperature, generator)
        return (
            actions.cpu().numpy().astype(np.int64, copy=False),
            log_prob.float().cpu().numpy(),
            value.float().cpu().numpy(),
        )
