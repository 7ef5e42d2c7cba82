"""Actor-critic ResNet tower for Keisei's core46 observation and 13,527-action space.

Architecture (all convolutions keep the 9x9 board; "C" = ``cfg.channels``, "B" = ``cfg.blocks``):

* stem: 3x3 conv 46 -> C, GroupNorm, ReLU;
* B residual blocks (He et al. 2016, "Deep Residual Learning for Image Recognition",
  arXiv:1512.03385): 3x3 conv, GN, ReLU, 3x3 conv, GN, optional squeeze-and-excitation
  (Hu et al. 2018, "Squeeze-and-Excitation Networks", arXiv:1709.01507; bottleneck
  ``C // cfg.se_ratio``), skip connection, ReLU;
* policy head, ``cfg.policy_head``:

  - ``"pointer"`` (default): per-square queries and keys from 1x1 convolutions (``cfg.policy_dim``
    wide, one pair for non-promoting and one for promoting moves); the logit of the board move
    from-square -> to-square is the scaled dot product ``<q_from, k_to> / sqrt(d)`` (the
    pointer-network scoring of Vinyals et al. 2015, arXiv:1506.03134, used for chess moves by
    e.g. Leela Chess Zero's attention policy), gathered into the 12,960 board actions with one
    index table; drops come from a 1x1 conv to 7 planes (one per hand piece type) = 567 logits;
    plus a learned bias per action. Weight sharing across squares makes it learn much faster
    than a dense layer, and it costs ~0.4 M multiply-adds per position instead of
    ``policy_planes * 81 * 13527``;
  - ``"dense"``: 1x1 conv C -> ``cfg.policy_planes``, GN, ReLU, flatten, Linear to 13,527 logits
    (the AlphaZero-style head, Silver et al. 2018, Science 362:1140, with a dense output layer);
* value head: 1x1 conv C -> :data:`VALUE_PLANES`, GN, ReLU, flatten, Linear to
  ``cfg.value_hidden``, ReLU, Linear to 1, tanh: the expected outcome in [-1, 1] from the side to
  move's point of view (the observation is always in the mover's frame).

The last policy layer starts with weights 100x smaller than PyTorch's default so that the initial
policy is close to uniform over the legal moves (Andrychowicz et al. 2021, "What Matters in
On-Policy Reinforcement Learning?", arXiv:2006.05990, section 3.2).

The model computes in float32; on CUDA callers may run it under ``torch.autocast("cuda",
dtype=torch.bfloat16)`` (the learner does when ``learner.amp``); the outputs are always returned as
float32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from keisei_stream.config import ModelConfig
from keisei_stream.rl.device import pick_device  # noqa: F401 - where play/ and the benchmarks import it from
from keisei_stream.shogi import NUM_ACTIONS, NUM_PLANES
from keisei_stream.shogi.actions import NUM_SQUARES

VALUE_PLANES = 2
"""Planes of the value head's 1x1 convolution."""


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (Wu & He 2018, "Group Normalization", arXiv:1803.08494).

    Not BatchNorm: PPO compares the policy that chose a move (the worker's forward pass) with the
    policy being trained, and BatchNorm computes a different function in training mode (minibatch
    statistics) than in inference mode (running statistics), and a different one for every
    minibatch. In a trial run that gap reached an approximate KL of 0.2-1,600 before the first
    optimiser step and stalled training. GroupNorm normalises each position on its own, so
    training and inference compute the same function.
    """
    groups = 8 if channels % 8 == 0 else (4 if channels % 4 == 0 else 1)
    return nn.GroupNorm(groups, channels)


class SqueezeExcitation(nn.Module):
    """Channel gating: global average pool, FC C -> C/r, ReLU, FC C/r -> C, sigmoid, scale.

    Hu et al. 2018, arXiv:1709.01507. Input and output ``(B, C, 9, 9)``.
    """

    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class ResidualBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN(-SE) + skip, ReLU (He et al. 2016). ``(B, C, 9, 9)`` in and out."""

    def __init__(self, channels: int, se: bool, se_ratio: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.se = SqueezeExcitation(channels, se_ratio) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.se is not None:
            y = self.se(y)
        return F.relu(x + y)


def _action_index() -> torch.Tensor:
    """``(13527,) int64``: for action ``a``, its column in the pointer head's ``(B, 2*81*81 + 7*81)``
    raw scores: board action -> ``promote * 6561 + from * 81 + to`` (the ``(2, 81, 81)`` dot products),
    drop ``12960 + k`` -> ``13122 + k`` (the drop planes). Layout: keisei_stream.shogi.actions."""
    a = torch.arange(81 * 80 * 2)
    promote = a % 2
    from_sq = a // 160
    to_idx = (a // 2) % 80
    to_sq = torch.where(to_idx < from_sq, to_idx, to_idx + 1)
    board = promote * 6561 + from_sq * 81 + to_sq
    return torch.cat([board, 2 * 6561 + torch.arange(7 * 81)])


class PointerPolicyHead(nn.Module):
    """Board-move logits as query/key dot products, drop logits from a 1x1 conv.

    Input ``(B, C, 9, 9)`` features (square ``sq = file_index * 9 + rank`` after ``flatten(2)``, the
    mover's frame, as the observation); output ``(B, 13527)`` float32 logits.
    """

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Conv2d(channels, 2 * dim, 1)
        self.key = nn.Conv2d(channels, 2 * dim, 1)
        self.drop = nn.Conv2d(channels, 7, 1)
        self.bias = nn.Parameter(torch.zeros(NUM_ACTIONS))
        self.register_buffer("action_index", _action_index(), persistent=False)
        with torch.no_grad():  # near-uniform initial policy
            self.query.weight.mul_(0.02)
            self.query.bias.zero_()
            self.drop.weight.mul_(0.01)
            self.drop.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        # The scale goes on the small query tensor, and one gather builds the 13,527 logits: every
        # full-width op costs a pass over (B, 13527) floats, which dominated the head's time.
        q = self.query(h).view(b, 2, self.dim, NUM_SQUARES) * (self.dim ** -0.5)
        k = self.key(h).view(b, 2, self.dim, NUM_SQUARES)
        scores = torch.matmul(q.transpose(2, 3), k).reshape(b, 2 * NUM_SQUARES * NUM_SQUARES)
        drops = self.drop(h).flatten(1)  # (B, 7 * 81), piece-major = the drop action layout
        logits = torch.cat([scores, drops], dim=1).index_select(1, self.action_index).float()
        return logits.add_(self.bias)


class ActorCritic(nn.Module):
    """Policy logits and value from a batch of core46 observations.

    Args:
        cfg: the ``model`` section of the run config (channels, blocks, se, se_ratio,
            policy_planes, value_hidden).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.stem = nn.Sequential(
            nn.Conv2d(NUM_PLANES, c, 3, padding=1, bias=False), norm(c), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(*[ResidualBlock(c, cfg.se, cfg.se_ratio) for _ in range(cfg.blocks)])
        self.policy_head = cfg.policy_head
        if cfg.policy_head == "pointer":
            self.pointer = PointerPolicyHead(c, cfg.policy_dim)
        else:
            self.policy_conv = nn.Sequential(
                nn.Conv2d(c, cfg.policy_planes, 1, bias=False), norm(cfg.policy_planes),
                nn.ReLU(inplace=True),
            )
            self.policy_fc = nn.Linear(cfg.policy_planes * NUM_SQUARES, NUM_ACTIONS)
            with torch.no_grad():  # near-uniform initial policy (Andrychowicz et al. 2021, arXiv:2006.05990)
                self.policy_fc.weight.mul_(0.01)
                self.policy_fc.bias.zero_()
        self.value_conv = nn.Sequential(
            nn.Conv2d(c, VALUE_PLANES, 1, bias=False), norm(VALUE_PLANES), nn.ReLU(inplace=True)
        )
        self.value_fc1 = nn.Linear(VALUE_PLANES * NUM_SQUARES, cfg.value_hidden)
        self.value_fc2 = nn.Linear(cfg.value_hidden, 1)

    def trunk(self, obs: torch.Tensor) -> torch.Tensor:
        """Shared tower: ``(B, 46, 9, 9)`` float32 -> ``(B, C, 9, 9)`` features."""
        return self.blocks(self.stem(obs))

    def value_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """Value head: features ``(B, C, 9, 9)`` -> ``(B,)`` float32 in [-1, 1] (side to move's view)."""
        v = self.value_conv(h).flatten(1)
        v = self.value_fc2(F.relu(self.value_fc1(v)))
        return torch.tanh(v.float()).squeeze(1)

    def policy_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """Policy head: features ``(B, C, 9, 9)`` -> raw logits ``(B, 13527)`` float32 (not masked)."""
        if self.policy_head == "pointer":
            return self.pointer(h)
        return self.policy_fc(self.policy_conv(h).flatten(1)).float()

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate a batch.

        Args:
            obs: ``(B, 46, 9, 9)`` float32 core46 planes, mover's frame.

        Returns:
            ``(logits, value)``: logits ``(B, 13527)`` float32, unmasked (see
            :func:`keisei_stream.rl.policy.masked_logits`); value ``(B,)`` float32 in [-1, 1],
            the expected outcome for the side to move.
        """
        h = self.trunk(obs)
        return self.policy_from_features(h), self.value_from_features(h)


def build_model(cfg: ModelConfig) -> ActorCritic:
    """A freshly initialised :class:`ActorCritic` on the CPU in float32 (training mode).

    Move it with ``.to(device)``. The model has no train/eval difference (GroupNorm, no dropout);
    ``.eval()`` before inference is still good practice.
    """
    return ActorCritic(cfg)


def maybe_compile(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``torch.compile(model)`` when ``cfg.compile`` is set, else ``model`` itself.

    The compiled module shares parameters with ``model``; save/load the uncompiled one (the
    checkpoint functions also unwrap ``_orig_mod``).
    """
    return torch.compile(model) if cfg.compile else model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The original module behind a ``torch.compile`` wrapper (or ``model`` itself)."""
    return getattr(model, "_orig_mod", model)
