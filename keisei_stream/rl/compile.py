"""``torch.compile`` without waiting for it: the learner trains eagerly until the compiled model is
ready, then switches, between two updates.

Compiling the gpu net takes minutes (Dynamo traces, Inductor generates and autotunes kernels, for
the forward with gradients, its backward, and the forward without gradients). Done in the training
thread before the first update, it delays the first update by all of it. :class:`CompileAhead`
compiles in a thread of its own instead, on a **copy** of the model (the same class, the same
parameter shapes, dtypes and device, its own values and gradients), so the warm-up's forward and
backward passes never touch the parameters, gradients or autograd version counters of the model
being trained meanwhile (a few MB: 13 MB for the gpu net). Dynamo keeps its compiled graphs with the ``forward`` code object and
guards on the tensors' properties, not on which module holds them, so the real model's compiled
wrapper finds the copy's graphs when it is switched to (checked by a test that counts compiled
frames).

Few graphs: the warm-up marks the batch dimension dynamic (``torch._dynamo.mark_dynamic``), so one
graph with gradients and one without serve every minibatch size; a second, small size (8) is
warmed up too, because a backend may guard its kernel choice on the batch size (the CPU's
convolution picks another backend below 16 rows: two graphs per mode there). A batch of one row
is specialised by Dynamo (compiled on first use, then cached).

A compile or warm-up that fails is logged with its traceback and the learner trains on eagerly;
the worker thread's exception is read from its future (never lost).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from keisei_stream.rl.device import use_device
from keisei_stream.shogi import NUM_PLANES

log = logging.getLogger("keisei.learner")

#: The small batch size also warmed up (see the module docstring).
SMALL_BATCH = 8


def warm_up_calls(model: nn.Module, sizes: tuple[int, ...], device: torch.device, amp: bool) -> None:
    """Run ``model`` forward and backward and forward without gradients, for a random batch of
    each of ``sizes`` rows on ``device`` with the batch dimension marked dynamic, under bf16
    autocast when ``amp`` (CUDA): what compiles every graph the learner's update will call. The
    backward writes ``.grad`` of ``model``'s parameters (a copy's, or the caller zeroes them)."""
    use_amp = amp and device.type == "cuda"
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (and so training) alone
    for n in sizes:
        for grad in (True, False):
            obs = torch.rand((n, NUM_PLANES, 9, 9), generator=gen).to(device)
            if n > 1:
                torch._dynamo.mark_dynamic(obs, 0)
            with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits, value = model(obs)
            if grad:  # .backward(), not autograd.grad: DDP's reducer expects its gradient hooks to run
                (logits.float().mean() + value.float().mean()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileAhead:
    """The compiled model, made in a background thread (module docstring).

    Args:
        model: the model being trained (its compiled wrapper is what :meth:`current` returns once
            ready; the model itself until then).
        device: its device. amp: bf16 autocast on CUDA (as the update runs it).
        minibatch: the update's minibatch size (warmed up, with :data:`SMALL_BATCH`).
        compile_fn: ``torch.compile`` (tests inject a slow or failing one).

    Attributes:
        state: ``compiling``, ``ready`` or ``failed``. seconds: how long compiling took.
        error: the failure's text, when it failed.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp: bool, minibatch: int,
                 compile_fn: Callable[[nn.Module], nn.Module] = torch.compile) -> None:
        self.model, self.device, self.amp, self.compile_fn = model, device, amp, compile_fn
        self.sizes = tuple(sorted({max(2, minibatch), SMALL_BATCH}, reverse=True))
        self.state, self.seconds, self.error = "compiling", 0.0, ""
        self._compiled: nn.Module | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")
        self.future: Future = self._pool.submit(self._compile)
        self._pool.shutdown(wait=False)

    def _compile(self) -> str:
        """The thread's work; every outcome is recorded (and logged) here, before the future
        completes, so :meth:`wait` and :meth:`current` see it."""
        t0 = time.monotonic()
        try:
            use_device(self.device)  # this thread's current device (events, streams, kernels)
            shadow = copy.deepcopy(self.model)
            warm_up_calls(self.compile_fn(shadow), self.sizes, self.device, self.amp)
            compiled = self.compile_fn(self.model)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiler: train on eagerly
            with self._lock:
                self.state, self.error, self.seconds = "failed", f"{type(exc).__name__}: {exc}", time.monotonic() - t0
            log.error("torch.compile failed after %.1f s; training goes on eagerly", self.seconds, exc_info=True)
            return self.state
        with self._lock:
            self._compiled, self.state, self.seconds = compiled, "ready", time.monotonic() - t0
        log.info("torch.compile ready after %.1f s (batch sizes %s warmed up); the next update runs compiled",
                 self.seconds, "/".join(map(str, self.sizes)))
        return self.state

    def current(self) -> nn.Module:
        """The compiled model once ready, else the eager one."""
        with self._lock:
            return self._compiled if self._compiled is not None else self.model

    def wait(self, timeout: float | None = None) -> str:
        """Wait for the compile to end (tests, benchmarks); returns :attr:`state`."""
        return self.future.result(timeout)  # _compile catches what the compiler raises
