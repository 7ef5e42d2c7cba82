"""The network inputs built on the device from their compact form (the learner's and a GPU worker's).

The dense inputs of one position are 28.4 KB (``obs (46, 9, 9) float32`` 14.9 KB + ``mask (13527,)
bool`` 13.5 KB); :func:`keisei_stream.shogi.encode_positions_compact` ships about 360 bytes plus
2 bytes per legal move instead (bit-packed piece planes, the 18 board-constant planes as scalars,
the legal action indices), and :func:`expand_inputs` rebuilds exactly the same tensors where the
model runs: unpacking bits and scattering the legal actions are cheap on a GPU, and the
host-to-device copy shrinks about 50-fold.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from keisei_stream.rl.device import to_device
from keisei_stream.experience import ExperienceBatch
from keisei_stream.shogi import NUM_ACTIONS, NUM_PLANES, encode_positions_compact
from keisei_stream.shogi.observation import PIECE_PLANES

#: np.packbits' big-endian bit order, kept on each device once (:func:`_bits`).
_BITS = (7, 6, 5, 4, 3, 2, 1, 0)
_BITS_ON: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    """The ``(8,) uint8`` shift table on ``device``, copied there once per device and process: a
    copy per call would come from pageable memory, which makes the host wait for the stream (and
    so keeps two groups' forward passes from overlapping)."""
    t = _BITS_ON.get(device)
    if t is None:
        with torch.inference_mode(False):  # a table created in inference mode could not be used outside it
            t = _BITS_ON.setdefault(device, torch.tensor(_BITS, dtype=torch.uint8).to(device))
    return t


def compact_nbytes(compact: dict[str, np.ndarray]) -> int:
    """Bytes of a compact input dict (what crosses to the device)."""
    return int(sum(a.nbytes for a in compact.values()))


def expand_inputs(compact: dict[str, np.ndarray], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(obs (P, 46, 9, 9) float32, mask (P, 13527) bool)`` on ``device`` from
    :func:`keisei_stream.shogi.encode_positions_compact`'s arrays (copied there first), equal to
    :func:`keisei_stream.shogi.encode_positions`'s for the same positions.
    """
    t = to_device(compact, torch.device(device))  # pinned, non-blocking on CUDA
    return expand_on_device(t["pieces"], t["scalars"], t["actions"], t["counts"])


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
    bits = (pieces.unsqueeze(-1) >> _bits(device)) & 1  # (P, 284, 8)
    board = bits.reshape(p, -1)[:, :PIECE_PLANES * 81].reshape(p, PIECE_PLANES, 9, 9).to(torch.float32)
    obs = torch.cat([board, scalars.reshape(p, NUM_PLANES - PIECE_PLANES, 1, 1).expand(p, -1, 9, 9)], dim=1)
    mask = torch.zeros(p, NUM_ACTIONS, dtype=torch.bool, device=device)
    rows = torch.repeat_interleave(torch.arange(p, device=device), counts.long(), output_size=actions.shape[0])
    mask[rows, actions.long()] = True
    return obs.contiguous(), mask


class CompactAhead:
    """Compact inputs (:func:`~keisei_stream.shogi.encode_positions_compact`) of experience
    batches, encoded ahead of their update: the learner's main thread encodes each entry as it
    arrives, while the previous update trains on the device, so an update starts with its inputs
    ready. Encoded per entry (an entry is a chunk of a few thousand positions), so no dense array
    of the update is ever built. Used from one thread (the learner's main thread).

    Args:
        max_plies: the run's ``env.max_plies`` (plane 43).
    """

    def __init__(self, max_plies: int) -> None:
        self.max_plies = max_plies
        self._held: dict[int, tuple[ExperienceBatch, dict[str, np.ndarray]]] = {}

    def _encode(self, b: ExperienceBatch) -> dict[str, np.ndarray]:
        return encode_positions_compact(b.hcp, b.ply, b.repetition, self.max_plies)

    def encode(self, batches: list[ExperienceBatch]) -> float:
        """Encode the batches not encoded yet and forget those not in ``batches`` (no longer
        held: taken, dead-lettered, lost); returns the seconds taken."""
        t0 = time.monotonic()
        wanted = {id(b) for b in batches}
        for k in [k for k in self._held if k not in wanted]:
            del self._held[k]
        for b in batches:
            if id(b) not in self._held:
                self._held[id(b)] = (b, self._encode(b))  # the batch is kept: its id stays unique
        return time.monotonic() - t0

    def take(self, batches: list[ExperienceBatch]) -> dict[str, np.ndarray]:
        """The compact inputs of ``batches`` concatenated in order (the update's ``b =
        concat_batches(batches)``), encoding those not encoded ahead; forgets them."""
        parts = [self._held.pop(id(b), (b, None))[1] for b in batches]
        parts = [p if p is not None else self._encode(b) for p, b in zip(parts, batches)]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("pieces", "scalars", "actions", "counts")}
