"""The GPU path of the learner and the worker, checked on the CPU where it can be, and on CUDA
under ``torch.cuda.set_sync_debug_mode("error")`` (skipped without CUDA: they run on the next lent
GPU, ``benchmarks/gpu.py`` runs them first).

On the CPU: the learner's compact, sync-free update (inputs expanded from the compact form, GAE's
scan on the device's tensors, rows gathered by index, one metrics read) gives the update of the
dense host path; the compile in the background leaves the first updates eager and switches after
it; a failed compile is logged and training goes on; GAE on tensors equals GAE on arrays.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from keisei_stream.config import load_config
from keisei_stream.rl import device as device_mod
from keisei_stream.rl.gae import compute_gae, scan_advantages, scan_plan, segment_advantages, segment_plan
from keisei_stream.rl.inputs import CompactAhead, expand_inputs
from keisei_stream.rl.selfplay import SelfPlay, random_policy_batch
from keisei_stream.rl.trainer import Trainer
from keisei_stream.experience import concat_batches
from keisei_stream.shogi import encode_positions, encode_positions_compact

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cfg(*overrides):
    return load_config(CONFIGS / "tiny.yaml", ["ppo.samples_per_update=512", "ppo.minibatch_size=128",
                                               "ppo.epochs=2", *overrides])


def _batch(version_spread: int = 3, seed: int = 0):
    """Self-play segments (cut with look-ahead, several games, several versions)."""
    parts = [random_policy_batch(200, max_plies=64, games=8, segment_plies=16, lookahead_plies=4, seed=seed + k,
                                 version=1 + k % version_spread, batch_id=f"w0:t:{k}") for k in range(3)]
    return parts, concat_batches(parts)


# ------------------------------------------------------------------------------ GAE on tensors
def test_gae_scan_on_tensors_equals_the_arrays():
    _, b = _batch()
    values = np.random.default_rng(0).uniform(-1, 1, b.num_positions)
    adv, ret, joins = segment_advantages(b, values, 0.99, 0.95)
    chains, plan = segment_plan(b, 0.99, 0.95)
    v = torch.from_numpy(values)[torch.from_numpy(chains.order)]
    a = scan_advantages(v, torch.from_numpy(plan.last), torch.from_numpy(plan.tail), torch.from_numpy(plan.by_level),
                        plan.bounds, 0.99, 0.95)
    got = torch.empty_like(a)
    got[torch.from_numpy(chains.order)] = a
    np.testing.assert_allclose(got.numpy(), adv, rtol=1e-6, atol=1e-6)
    assert joins == chains.joins > 0


def test_scan_plan_rejects_bad_offsets():
    with pytest.raises(ValueError):
        scan_plan(np.array([0, 5, 3]), np.zeros(2), 1.0, 1.0, None, None, 3)
    assert compute_gae(np.zeros(0), np.array([0]), np.zeros(0), 1.0, 1.0)[0].shape == (0,)


# ------------------------------------------------------------------------------ compact inputs
def test_compact_inputs_are_built_in_chunks_equal_to_the_dense_ones():
    _, b = _batch()
    dense_obs, dense_mask = encode_positions(b.hcp, b.ply, b.repetition, 64)
    for chunk in (1, 37, 100000):
        obs, mask = expand_inputs(encode_positions_compact(b.hcp, b.ply, b.repetition, 64, chunk=chunk), "cpu")
        assert torch.equal(obs, torch.from_numpy(dense_obs)) and torch.equal(mask, torch.from_numpy(dense_mask))


def test_inputs_encoded_ahead_are_taken_in_order_and_forgotten():
    parts, b = _batch()
    ahead = CompactAhead(64)
    assert ahead.encode(parts[:2]) >= 0
    whole = ahead.take(parts)  # the third one is encoded now
    ref = encode_positions_compact(b.hcp, b.ply, b.repetition, 64)
    assert all(np.array_equal(whole[k], ref[k]) for k in ref)
    ahead.encode(parts[1:2])
    ahead.encode([])  # no longer held: forgotten
    assert not ahead._held


# ------------------------------------------------------------------------------ the sync-free update
@pytest.mark.parametrize("recompute", [True, False])
def test_the_compact_update_equals_the_dense_one(recompute):
    """The GPU's update path (compact inputs, GAE on the device, rows by index, metrics read once),
    run on the CPU, trains the same as the CPU's dense path."""
    cfg = _cfg(f"ppo.recompute_values={str(recompute).lower()}", "ppo.max_policy_lag=1")
    parts, b = _batch()
    results = []
    for compact in (False, True):
        t = Trainer.build(cfg, torch.device("cpu"))
        t.compact, t.ahead = compact, CompactAhead(cfg.env.max_plies) if compact else None
        upd = t.update(b, version=3, compact=t.take_ahead(parts))
        results.append((upd, [p.detach().clone() for p in t.model.parameters()]))
    (dense, p_dense), (comp, p_comp) = results
    assert np.array_equal(dense.keep, comp.keep) and 0 < dense.keep.sum() < len(dense.keep)  # some stale rows
    for a, c in zip(p_dense, p_comp):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "explained_variance", "minibatches", "epochs_run",
              "is_weight_mean", "trained_positions", "stale_positions", "segment_joins"):
        assert dense.metrics[k] == pytest.approx(comp.metrics[k], rel=1e-4, abs=1e-6), k
    if recompute:
        assert comp.metrics["value_staleness"] == pytest.approx(dense.metrics["value_staleness"], rel=1e-4)


# ------------------------------------------------------------------------------ compile in the background
def test_the_learner_trains_eagerly_until_the_compile_is_ready_then_switches(caplog):
    """A deliberately slow compile: the first updates run eagerly while it compiles, the update
    after it is ready runs the compiled module (here a wrapper that counts its calls)."""
    release = threading.Event()
    calls = {"compiled": 0}

    class Compiled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner  # what a torch.compile wrapper holds

        def forward(self, x):
            calls["compiled"] += 1
            return self._orig_mod(x)

    def slow_compile(model):
        release.wait(30)  # "compiling" until the test lets it finish
        return Compiled(model)

    cfg = _cfg("model.compile=true")
    parts, b = _batch()
    t = Trainer.build(cfg, torch.device("cpu"))
    t.wrap(compile_ahead=True, compile_fn=slow_compile)
    t0 = time.monotonic()
    first = [t.update(b, version=3) for _ in range(2)]
    assert time.monotonic() - t0 < 25 and t.compiling.state == "compiling"
    assert all(u.stepped and u.metrics["compiled"] == 0.0 for u in first) and calls["compiled"] == 0
    release.set()
    with caplog.at_level(logging.INFO, logger="keisei.learner"):
        assert t.compiling.wait(30) == "ready"
    after = t.update(b, version=3)
    assert after.stepped and after.metrics["compiled"] == 1.0 and calls["compiled"] > 0
    assert t.train_model._orig_mod is t.model
    assert "torch.compile ready" in caplog.text


def test_a_failed_compile_is_logged_and_training_goes_on_eagerly(caplog):
    def broken(model):
        raise RuntimeError("inductor exploded")

    cfg = _cfg("model.compile=true")
    _, b = _batch()
    t = Trainer.build(cfg, torch.device("cpu"))
    with caplog.at_level(logging.ERROR, logger="keisei.learner"):
        t.wrap(compile_ahead=True, compile_fn=broken)
        assert t.compiling.wait(30) == "failed"
    assert "inductor exploded" in t.compiling.error and "inductor exploded" in caplog.text
    u = t.update(b, version=3)
    assert u.stepped and u.metrics["compiled"] == 0.0 and t.train_model is t.model


def test_the_compiled_graphs_of_the_copy_serve_the_real_model():
    """Dynamo keeps graphs with the forward's code and guards on tensor properties: the copy
    warmed up in the background compiles everything, the real model's calls compile nothing
    more (batch sizes of a run: the minibatch, a remainder, a small one)."""
    from torch._dynamo.testing import CompileCounter

    from keisei_stream.rl.compile import CompileAhead

    torch._dynamo.reset()
    counter = CompileCounter()
    cfg = _cfg("model.compile=true")
    t = Trainer.build(cfg, torch.device("cpu"))
    ahead = CompileAhead(t.model, t.device, amp=False, minibatch=64, compile_fn=lambda m: torch.compile(m, backend=counter))
    assert ahead.wait(120) == "ready", ahead.error
    warmed = counter.frame_count
    assert warmed <= 4  # with and without gradients, x (a large and a small size) at most
    model = ahead.current()
    for n in (64, 37, 9, 3):
        logits, value = model(torch.rand(n, 46, 9, 9))
        (logits.mean() + value.mean()).backward()
        with torch.no_grad():
            model(torch.rand(n, 46, 9, 9))
    assert counter.frame_count == warmed
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ devices
def test_a_device_torch_cannot_use_names_the_device_the_build_and_the_driver():
    if torch.cuda.is_available():
        name = f"cuda:{torch.cuda.device_count()}"
    else:
        name = "cuda"
    with pytest.raises(device_mod.DeviceError) as err:
        device_mod.pick_device(name)
    text = str(err.value)
    assert name in text and ("CUDA" in text or "CPU-only" in text) and "driver" in text.lower()
    with pytest.raises(device_mod.DeviceError):
        device_mod.pick_device("tpu")


def test_auto_says_which_device_it_took_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="keisei.device"):
        dev = device_mod.pick_device("auto")
    assert f"device auto -> {dev}" in caplog.text
    if dev.type == "cpu":
        assert "not usable" in caplog.text


# ------------------------------------------------------------------------------ CUDA, sync-free
@needs_cuda
def test_cuda_learner_update_never_waits_for_the_device():
    """A learner update on CUDA under set_sync_debug_mode("error"): any host synchronisation but
    the one metrics read (rl.device.read_host) raises."""
    cfg = _cfg("ppo.recompute_values=true", "learner.amp=true", "ppo.target_kl=0.0001")
    parts, b = _batch()
    t = Trainer.build(cfg, device_mod.pick_device("cuda"))
    t.update(b, version=3, compact=t.take_ahead(parts))  # first call: lazy CUDA initialisations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = t.update(b, version=3, compact=t.take_ahead(parts))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert u.stepped and np.isfinite(u.metrics["policy_loss"])


@needs_cuda
def test_cuda_worker_step_never_waits_except_for_its_results():
    """A GPU worker's steps under set_sync_debug_mode("error"): the only wait is the blocking
    event of the results it needs next."""
    from keisei_stream.config import ModelConfig
    from keisei_stream.rl.model import build_model

    dev = device_mod.use_device(device_mod.pick_device("cuda"))
    model = build_model(ModelConfig(channels=16, blocks=1)).to(dev).eval()
    sp = SelfPlay(model, games=16, max_plies=64, segment_plies=8, lookahead_plies=2, temperature=1.0, seed=0,
                  device=dev)
    for _ in range(3):
        sp.step(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            sp.step(1)
        segments = sp.flush()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert segments and all(-1.0 <= s.bootstrap <= 1.0 for s in segments)


@needs_cuda
def test_cuda_flush_bootstraps_from_finished_copies():
    """flush() reads the pinned results only after their copies ran: its bootstrap values equal
    the model's values of the same positions computed apart."""
    from keisei_stream.config import ModelConfig
    from keisei_stream.rl.model import build_model

    dev = device_mod.pick_device("cuda")
    model = build_model(ModelConfig(channels=16, blocks=1)).to(dev).eval()
    sp = SelfPlay(model, games=8, max_plies=64, segment_plies=64, temperature=1.0, seed=0, device=dev, amp=False)
    for _ in range(5):
        sp.step(1)
    expected = []
    for g in sp.groups:
        obs = torch.from_numpy(g.env.observe()[0].copy()).to(dev)
        with torch.inference_mode():
            values = model(obs)[1].float().cpu().numpy()
        expected += [values[i] for i in np.flatnonzero(g.traj.length)]
    got = np.array([s.bootstrap for s in sp.flush()])
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_a_worker_on_the_second_device_waits_for_its_own_work():
    """A worker on cuda:1 stepped from a thread whose current device is cuda:0: its events are
    recorded on cuda:1's stream, so flush() reads finished results."""
    from keisei_stream.config import ModelConfig
    from keisei_stream.rl.model import build_model

    dev = torch.device("cuda", 1)
    model = build_model(ModelConfig(channels=16, blocks=1)).to(dev).eval()
    sp = SelfPlay(model, games=8, max_plies=64, segment_plies=64, temperature=1.0, seed=0, device=dev, amp=False)
    with torch.cuda.device(0):
        for _ in range(3):
            sp.step(1)
        got = [s.bootstrap for s in sp.flush()]
    assert len(got) == 8 and all(-1.0 <= x <= 1.0 for x in got)


@pytest.mark.redis
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot be used")
def test_keisei_run_stops_at_once_on_a_device_torch_cannot_use(tmp_path):
    """`keisei run --set worker.device=cuda` without a usable CUDA: the worker stops with the
    message naming the device, the CUDA build and the driver; the run ends within seconds with a
    non-zero status and that message, and nothing is restarted (real processes, a private Redis)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", str(root / "configs" / "tiny.yaml"),
           "--workers", "1", "--duration", "120s", "--no-live", "--run", "baddev", "--set", f"run.dir={tmp_path}",
           "--set", "worker.device=cuda"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=150)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert took < 60, (took, out)  # starting, stopping and the final status included; the duration was 120 s
    assert "w0 stopped on a configuration error" in out and "'cuda' cannot be used" in out, out
    assert "driver" in out.lower() and ("CPU-only" in out or "CUDA" in out), out
    assert "restarted" not in out, out
