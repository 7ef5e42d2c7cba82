"""The network inputs built on the device from their compact form (the learner's and a GPU worker's).

The dense inputs of one position are 28.4 KB (``obs (46, 9, 9) float32`` 14.9 KB + ``mask (13527,)
bool`` 13.5 KB); :func:`keisei_stream.shogi.encode_positions_compact` ships about 360 bytes plus
2 bytes per legal move instead (bit-packed piece planes, the 18 board-constant planes as scalars,
the legal action indices), and :func:`expand_inputs` rebuilds exactly the same tensors where the
model runs: unpacking bits and scattering the legal actions are cheap on a GPU, and the
host-to-device copy shrinks about 50-fold.
"""

from __future__ import annotations

import numpy as np
import torch

from keisei_stream.shogi import NUM_ACTIONS, NUM_PLANES
from keisei_stream.shogi.observation import PIECE_PLANES

_BITS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)  # np.packbits' big-endian bit order


def compact_nbytes(compact: dict[str, np.ndarray]) -> int:
    """Bytes of a compact input dict (what crosses to the device)."""
    return int(sum(a.nbytes for a in compact.values()))


def expand_inputs(compact: dict[str, np.ndarray], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(obs (P, 46, 9, 9) float32, mask (P, 13527) bool)`` on ``device`` from
    :func:`keisei_stream.shogi.encode_positions_compact`'s arrays (copied there first), equal to
    :func:`keisei_stream.shogi.encode_positions`'s for the same positions.
    """
    device = torch.device(device)
    nb = device.type == "cuda"
    return expand_on_device(torch.from_numpy(compact["pieces"]).to(device, non_blocking=nb),
                            torch.from_numpy(compact["scalars"]).to(device, non_blocking=nb),
                            torch.from_numpy(compact["actions"].astype(np.int64)).to(device, non_blocking=nb),
                            torch.from_numpy(compact["counts"].astype(np.int64)).to(device, non_blocking=nb))


def expand_on_device(pieces: torch.Tensor, scalars: torch.Tensor, actions: torch.Tensor,
                     counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense inputs from the compact ones already on their device, without waiting for it.

    Args:
        pieces: ``(P, 284) uint8`` bit-packed planes 0-27. scalars: ``(P, 18) float32`` planes 28-45.
        actions: ``(M,)`` integer legal actions, back to back. counts: ``(P,)`` integer legal
            actions per position (summing to M).

    Returns:
        ``(obs (P, 46, 9, 9) float32, mask (P, 13527) bool)`` on the same device.
    """
    device = pieces.device
    p = pieces.shape[0]
    bits = (pieces.unsqueeze(-1) >> _BITS.to(device)) & 1  # (P, 284, 8)
    board = bits.reshape(p, -1)[:, :PIECE_PLANES * 81].reshape(p, PIECE_PLANES, 9, 9).to(torch.float32)
    obs = torch.cat([board, scalars.reshape(p, NUM_PLANES - PIECE_PLANES, 1, 1).expand(p, -1, 9, 9)], dim=1)
    mask = torch.zeros(p, NUM_ACTIONS, dtype=torch.bool, device=device)
    rows = torch.repeat_interleave(torch.arange(p, device=device), counts.long(), output_size=actions.shape[0])
    mask[rows, actions.long()] = True
    return obs.contiguous(), mask
