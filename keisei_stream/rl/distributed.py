"""Data-parallel learners with ``torch.distributed``: the few collectives the learner and PPO use.

Several learner processes ("ranks") train one model: each is a consumer of the group ``learners``,
trains on the entries it read, and the gradients of every minibatch are averaged across ranks by
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), so all ranks hold identical parameters
after every optimiser step. Rank 0 publishes weights and writes checkpoints.

A process is a rank when the variables of ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``; https://pytorch.org/docs/stable/elastic/run.html) say so and
``WORLD_SIZE > 1``; otherwise every function here is the single-process identity and nothing of
``torch.distributed`` is initialised. A rank that dies makes the others' next collective fail
(gloo: at once, the peer's socket closes; at the latest after ``timeout_s``): every rank then exits
with an error and torchrun's elastic agent restarts the group (``--max-restarts``), which resumes
from the newest checkpoint (:func:`restarted`).
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import os
import signal

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group described by torchrun's environment, if ``WORLD_SIZE > 1``.

    Args:
        device: the device picked for this process; on CUDA each rank takes ``cuda:LOCAL_RANK``.
        timeout_s: seconds a collective waits for a missing rank before failing (seconds).

    Returns:
        The device this rank trains on.

    Raises:
        RuntimeError: ranks on several nodes with torchrun's store shared across restarts (start
            torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, see below); or from
            ``torch.distributed.init_process_group`` (no rendezvous; also ValueError).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared_store and int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        raise RuntimeError("learner ranks on several nodes: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                           "in its environment (a fresh store for every restart of the group; docs/scaling.md)")
    _die_with_agent()
    global _RANK_DEVICE
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # this thread's; the training thread sets its own (rl.device.use_device)
        _RANK_DEVICE = device
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    if shared_store:
        # The store of torchrun's agent outlives a restart of the group: the new ranks must not
        # read the addresses their dead predecessors left there (seen: the new rank 1 connecting
        # to the old rank 0's port and failing), so every attempt uses keys of its own. This
        # needs every rank to count the same restarts: true of one agent (one node), not of
        # several (an agent restarted for a failure counts it, one restarted because another
        # node rejoined does not; the ranks then wait for each other under different keys), so
        # several nodes take a store of the round's rank 0 instead, new at every restart (above).
        store = dist.PrefixStore(f"keisei/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_,
                            world_size=world, timeout=timeout)
    return device


def _die_with_agent() -> None:
    """Under torchrun's agent, get SIGTERM when the agent dies (Linux ``PR_SET_PDEATHSIG``): its
    ranks run in sessions of their own, so a SIGKILLed agent would leave them orphaned, holding
    their entries. SIGTERM is the learner's ordinary stop (drain, checkpoint)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux
        pass


def world_size() -> int:
    """Number of learner ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This learner's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def restarted() -> bool:
    """True in a group restarted by torchrun's elastic agent (``TORCHELASTIC_RESTART_COUNT > 0``):
    it must resume from the newest checkpoint, whatever the command line said."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


#: The CUDA device of this rank (set by :func:`init_from_env`), for the collectives that stage
#: host values: read from here, not from ``torch.cuda.current_device()``, which is the calling
#: thread's (0 in the learner's training thread unless it set its own).
_RANK_DEVICE: torch.device | None = None


def _device() -> torch.device:
    """The device collectives run on: NCCL needs CUDA tensors (this rank's device), gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        assert _RANK_DEVICE is not None, "init_from_env sets the rank's device before NCCL collectives"
        return _RANK_DEVICE
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum (``op="sum"``) or maximum (``op="max"``) of ``values`` over all ranks,
    as float64 (exact for integers below 2**53). One collective; the identity on one rank."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_(values: list[torch.Tensor], op: str = "sum", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` (0-d tensors on the model's device) stacked into one ``dtype`` tensor and
    reduced over all ranks on the device (sum or max), without waiting for the host: what a
    minibatch needs (its KL, whether its loss was finite) and the update's sums (float64). The
    stacked tensor itself on one rank."""
    t = torch.stack([v.to(dtype) for v in values])
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_int(value: int) -> list[int]:
    """``value`` of every rank, in rank order (``[value]`` on one rank)."""
    if world_size() == 1:
        return [int(value)]
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's ``data`` on every rank (other ranks pass None); two collectives (length, bytes)."""
    if world_size() == 1:
        assert data is not None
        return data
    dev = _device()
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=0)
    if rank() == 0:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy())


def params_digest(model: nn.Module) -> str:
    """sha256 (hex) of every parameter's bytes in ``named_parameters`` order: equal on two ranks
    exactly when their parameters are bitwise identical."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_in_sync(model: nn.Module) -> str:
    """The parameter digest of this rank, after checking that every rank has the same one.

    Raises:
        RuntimeError: the ranks' parameters differ (a bug: training must stop, not diverge).
    """
    digest = params_digest(model)
    if world_size() == 1:
        return digest
    mine = int(digest[:13], 16)  # 52 bits: exact in float64
    lo, hi = all_reduce([-mine, mine], op="max")
    if -lo != hi:
        raise RuntimeError(f"learner ranks hold different parameters (rank {rank()}: {digest[:16]})")
    return digest


def shutdown() -> None:
    """Leave the process group (at a clean stop)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
