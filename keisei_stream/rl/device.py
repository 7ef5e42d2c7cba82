"""Devices: which one a process uses (and why), and moving host data to it without waiting.

* :func:`pick_device` resolves ``auto``/``cpu``/``cuda``/``cuda:N`` once at a process's start. A
  device that torch cannot use is a configuration error (:class:`DeviceError`, a
  :class:`~keisei_stream.config.ConfigError`): its message names the device, the CUDA build of torch
  (``torch.version.cuda``) and the driver (``nvidia-smi``'s, or what CUDA's initialisation said),
  so a worker or learner given such a device stops at once instead of being restarted forever
  (``keisei run`` stops the run on it). ``auto`` logs which device it took and why.
* :func:`use_device` makes a CUDA device the **current device of the calling thread**: events,
  streams and ``torch.cuda.current_device()`` follow the thread's current device, which is 0 in a
  new thread whatever the process set elsewhere (DESIGN.md, "Known traps").
* :func:`to_device` copies host arrays to the device through pinned memory with non-blocking copies:
  a ``.to(device)`` from pageable memory makes the host wait for the stream.
* :func:`read_host` is the one deliberate host synchronisation of a learner update (its metrics),
  allowed even under ``torch.cuda.set_sync_debug_mode("error")``, which the CUDA tests set so that
  any other synchronisation fails them.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from typing import Iterator, Mapping

import numpy as np
import torch

from keisei_stream.config import ConfigError

log = logging.getLogger("keisei.device")


class DeviceError(ConfigError):
    """A device named in the config or on the command line that torch cannot use (a configuration
    error: restarting the process does not help)."""


def nvidia_driver() -> str:
    """The NVIDIA driver as ``nvidia-smi`` reports it (``"driver 580.159.04, 1 GPU(s): NVIDIA
    H200"``), or why there is none to report. Never raises."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "no NVIDIA driver found (nvidia-smi is not on the PATH)"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version,name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    rows = [r.split(",", 1) for r in out.stdout.strip().splitlines() if r.strip()]
    if out.returncode != 0 or not rows:
        return f"nvidia-smi found no GPU ({(out.stderr or out.stdout).strip()[:200] or f'exit {out.returncode}'})"
    return f"driver {rows[0][0].strip()}, {len(rows)} GPU(s): {', '.join(r[-1].strip() for r in rows)}"


def cuda_build() -> str:
    """``"torch 2.13.0 built with CUDA 12.8"`` or ``"... a CPU-only build (no CUDA)"``."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__} " + (f"built with CUDA {cuda}" if cuda else "is a CPU-only build")


def cuda_unavailable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False: what CUDA's initialisation says (for example
    "The NVIDIA driver on your system is too old"), or that torch has no CUDA at all."""
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the message is the point
        return str(exc).strip().splitlines()[0][:300] or type(exc).__name__
    return f"CUDA initialised but reports {torch.cuda.device_count()} device(s)"


def describe_cuda() -> str:
    """One line for an error message or a log: the CUDA build and the driver."""
    return f"{cuda_build()}; {nvidia_driver()}"


def pick_device(name: str = "auto") -> torch.device:
    """Resolve a device name once, at a process's start.

    Args:
        name: ``"auto"`` (the first CUDA device when torch can use one, else the CPU; the choice
            and its reason are logged), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The device; a CUDA one always with its index (``cuda`` -> ``cuda:0``).

    Raises:
        DeviceError: an unknown name, or a CUDA device torch cannot use (no CUDA build, no or too
            old a driver, no such index); the message names the device, the CUDA build and the driver.
    """
    if name == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda", 0)
            log.info("device auto -> %s (%s; %s)", dev, torch.cuda.get_device_name(0), describe_cuda())
            return dev
        log.info("device auto -> cpu: CUDA is not usable (%s; %s)", cuda_unavailable_reason(), describe_cuda())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r} (auto, cpu, cuda, cuda:N)")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} cannot be used: {cuda_unavailable_reason()} ({describe_cuda()}); "
                          f"use device auto or cpu, or install a CUDA build of torch that this driver runs "
                          f"(scripts/setup.sh on a machine where nvidia-smi lists a GPU installs and checks one)")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} cannot be used: torch sees {torch.cuda.device_count()} CUDA device(s) "
                          f"({describe_cuda()})")
    return torch.device("cuda", index)


def gpu_utilisation(device: torch.device) -> float | None:
    """NVML's utilisation of ``device`` (percent: the share of the last sample period in which a
    kernel ran; it reads high for many tiny launches too, so it tells "busy" only loosely), or
    None on the CPU or without nvidia-ml-py. Never raises."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no pynvml, no permission: unknown
        return None


def use_device(device: torch.device | str) -> torch.device:
    """Make ``device`` the calling thread's current CUDA device (nothing for the CPU); call it in
    every thread that launches work on it. Returns the device with its index."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def to_device(arrays: Mapping[str, np.ndarray | torch.Tensor], device: torch.device,
              dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Host arrays on ``device`` without the host waiting: on CUDA each is staged in pinned memory
    (torch's caching host allocator, which keeps the block until the copy has run) and copied with
    ``non_blocking=True`` on the device's current stream; on the CPU they are wrapped (no copy).

    Args:
        arrays: name -> NumPy array or CPU tensor. dtypes: name -> dtype to convert to on the
            device (after the copy; the bytes cross in their own dtype).

    Returns:
        name -> tensor on ``device``.
    """
    dtypes = dtypes or {}
    out = {}
    for k, a in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        out[k] = t.to(dtypes[k]) if k in dtypes else t
    return out


@contextlib.contextmanager
def sync_allowed() -> Iterator[None]:
    """Allow host synchronisations inside the block even under ``set_sync_debug_mode("error")``
    (restored afterwards); for :func:`read_host` and the few documented waits."""
    if not torch.cuda.is_available():
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def read_host(t: torch.Tensor) -> list[float]:
    """``t`` (any shape, any device) as a flat list of Python floats: the one host
    synchronisation of a learner update (its metrics, read once at its end)."""
    with sync_allowed():
        return t.detach().double().reshape(-1).tolist()
