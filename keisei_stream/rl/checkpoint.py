"""Learner checkpoints (one file per version) and the weights blob published to workers.

Checkpoint file ``ckpt_{version:08d}.pt`` (``torch.save`` of a dict of tensors and primitives
only, so it loads with ``torch.load(weights_only=True)``: no pickle of arbitrary objects):

* ``format`` (int), ``model`` (state dict), ``optimizer`` / ``scheduler`` (state dicts or None),
  ``version``, ``updates`` (ints), ``config_json`` (str), ``extra`` (dict of primitives or None);
* ``rng``: ``python`` ``{"version": int, "state": list[int], "gauss": float | None}``,
  ``numpy`` ``{"keys": uint32 values as int64 tensor (624,), "pos": int, "has_gauss": int,
  "cached_gaussian": float}``, ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, one per
  device; empty without CUDA).

Writes are atomic: a temporary file in the same directory, fsync, then ``os.replace``.

Weights blob: safetensors bytes (https://github.com/huggingface/safetensors) of the model's state
dict, floating tensors in float32 or bfloat16, integer buffers unchanged;
metadata ``{"format": "keisei-weights-1", "dtype": ...}``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from keisei_stream.config import ModelConfig, config_from_json
from keisei_stream.rl.device import to_device
from keisei_stream.rl.model import build_model, unwrap

FORMAT = 1
WEIGHTS_FORMAT = "keisei-weights-1"
_CKPT_RE = re.compile(r"^ckpt_(\d{8,})\.pt$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# RNG states as tensors / primitives
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    pv, pstate, pgauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(pv), "state": [int(x) for x in pstate], "gauss": pgauss},
        "numpy": {
            "name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    py = rng["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
    npr = rng["numpy"]
    np.random.set_state((npr["name"], npr["keys"].numpy().astype(np.uint32), int(npr["pos"]),
                         int(npr["has_gauss"]), float(npr["cached_gaussian"])))
    torch.set_rng_state(rng["torch"].cpu().to(torch.uint8))
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in cuda])


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_name(version: int) -> str:
    """File name of the checkpoint of ``version``: ``ckpt_{version:08d}.pt``."""
    return f"ckpt_{int(version):08d}.pt"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsync'd on some platforms
        pass


def save_checkpoint(
    path: str | Path | BinaryIO,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    version: int,
    updates: int,
    config_json: str,
    extra: dict | None = None,
) -> Path:
    """Write everything needed to resume training exactly, atomically (tmp file + ``os.replace``).

    Args:
        path: target file (by convention ``runs/{run}/checkpoints/ckpt_{version:08d}.pt``), or
            an open binary file (written as is: how rank 0 hands its state to the other learner ranks).
        model: the model (a ``torch.compile`` wrapper is unwrapped).
        optimizer, scheduler: their state dicts are stored (None allowed).
        version: model version; updates: PPO updates done; config_json: the resolved run config.
        extra: small dict of primitives (str/int/float/bool/None/lists/dicts/tensors).

    Returns:
        The path written (the file object, for a file).
    """
    state = {
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "version": int(version),
        "updates": int(updates),
        "config_json": str(config_json),
        "extra": dict(extra) if extra is not None else None,
        "rng": _rng_state(),
    }
    if hasattr(path, "write"):
        torch.save(state, path)
        return path
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def read_checkpoint(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, loaded with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing/unreadable file or not a keisei checkpoint.
    """
    try:
        state = torch.load(path if hasattr(path, "read") else Path(path), map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:  # corrupt zip, unpickling refused, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a keisei-stream checkpoint (format {FORMAT})")
    return state


def load_checkpoint(
    path: str | Path | BinaryIO,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` (and optimizer, scheduler, RNG states).

    Args:
        path: a file written by :func:`save_checkpoint` (a path or an open binary file).
        model: a model of the same architecture (strict state-dict match).
        optimizer, scheduler: restored when given (and stored).
        map_location: where tensors are loaded (the model's device is kept by ``load_state_dict``).
        restore_rng: also restore Python, NumPy, torch (and CUDA) RNG states, so training continues
            exactly as it would have.

    Returns:
        ``{"version": int, "updates": int, "config_json": str, "extra": dict | None}``.

    Raises:
        CheckpointError (a ValueError): unreadable file or state that does not fit the model.
    """
    state = read_checkpoint(path, map_location)
    try:
        unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc
    if restore_rng and state.get("rng") is not None:
        _set_rng_state(state["rng"])
    return _info(state)


def _info(state: dict[str, Any]) -> dict[str, Any]:
    """``version``, ``updates``, ``config_json`` and ``extra`` of a checkpoint dict."""
    return {"version": int(state["version"]), "updates": int(state["updates"]),
            "config_json": state["config_json"], "extra": state.get("extra")}


def load_model_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """Build the model described by a checkpoint's stored config and load its weights (eval mode).

    Does not touch RNG states. Returns ``(model, info)`` with ``info`` as in :func:`load_checkpoint`
    plus ``"config"`` (the :class:`keisei_stream.config.Config`).

    Raises:
        CheckpointError: unreadable checkpoint; ``keisei_stream.config.ConfigError``: bad config.
    """
    state = read_checkpoint(path, map_location)
    cfg = config_from_json(state["config_json"])
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its own config: {exc}") from exc
    model.to(map_location).eval()
    return model, {**_info(state), "config": cfg}


def _list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``ckpt_*.pt`` with the highest version in ``directory``; None when there is none."""
    found = _list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (by version). Returns the deleted paths.

    Raises:
        ValueError: ``keep < 1``.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    found = _list_checkpoints(directory)
    removed = []
    for _, p in found[:-keep]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------------------------
# Weights for workers
# ----------------------------------------------------------------------------------------------
def weights_bytes_bound(cfg: ModelConfig, dtype: str = "float32") -> int:
    """An upper bound of ``len(weights_to_bytes(build_model(cfg), dtype))`` in bytes, without
    allocating the model (it is built on the ``meta`` device): the tensors' bytes in ``dtype``
    plus the safetensors header (an 8-byte length and a JSON entry per tensor, bounded by 256
    bytes each, plus 1 KiB of metadata). What a server's request-size limit must let through
    (:func:`keisei_stream.ops.local.request_limit`).

    Raises:
        ValueError: unknown dtype.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"weights dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    with torch.device("meta"):
        state = build_model(cfg).state_dict()
    item = _DTYPES[dtype].itemsize
    data = sum(t.numel() * (item if t.is_floating_point() else t.element_size()) for t in state.values())
    return int(data + 8 + 256 * len(state) + 1024)


def weights_to_bytes(model: nn.Module, dtype: str = "float32") -> bytes:
    """The model's state dict as safetensors bytes (what the learner publishes to Redis).

    Args:
        model: the model (compile wrapper unwrapped; tensors copied to the CPU).
        dtype: ``"float32"`` or ``"bfloat16"`` for floating tensors (bfloat16 halves the size;
            integer buffers are kept as they are).

    Raises:
        ValueError: unknown dtype, or a floating tensor holds NaN or infinity (such weights are
            never published).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"weights dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    target = _DTYPES[dtype]
    tensors = {}
    for k, t in unwrap(model).state_dict().items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"weights: {k} holds non-finite values")
            t = t.to(target)
        tensors[k] = t.contiguous()
    return safetensors_save(tensors, metadata={"format": WEIGHTS_FORMAT, "dtype": dtype})


def load_weights_bytes(model: nn.Module, data: bytes) -> None:
    """Load safetensors bytes from :func:`weights_to_bytes` into ``model`` (in place).

    Floating tensors are converted back to the dtype of the model's own tensors (so bfloat16
    weights load into a float32 model); the model keeps its device (on CUDA the new values cross
    from pinned memory without the host waiting: a forward pass already queued uses the old ones).

    Raises:
        ValueError: not bytes, not safetensors, names/shapes that do not match the model, or
            non-finite values (nothing is loaded then).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"weights must be bytes, got {type(data).__name__}")
    try:
        tensors = safetensors_load(bytes(data))
    except Exception as exc:  # SafetensorError, header/JSON errors, ...
        raise ValueError(f"weights are not valid safetensors data: {exc}") from exc
    target = unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    converted = {}
    for k, ref in own.items():
        t = tensors[k]
        if t.shape != ref.shape:
            raise ValueError(f"weights: {k} has shape {tuple(t.shape)}, model expects {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise ValueError(f"weights: {k} has dtype {t.dtype}, model expects {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"weights: {k} holds non-finite values")
        converted[k] = t.to(ref.dtype)
    dev = next(iter(own.values())).device if own else torch.device("cpu")
    if dev.type == "cuda":  # staged through pinned memory: the copies queue behind the work in flight, no wait
        converted = to_device(converted, dev)
    target.load_state_dict(converted)
