"""Checkpoints resume training exactly; weights bytes round trip; bad data is refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from keisei_stream.rl.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    load_model_from_checkpoint,
    load_weights_bytes,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    weights_to_bytes,
)
from keisei_stream.config import Config, ModelConfig, PPOConfig
from keisei_stream.rl.model import NUM_ACTIONS, build_model
from keisei_stream.rl.ppo import make_optimizer, make_scheduler, ppo_update


_MODEL = ModelConfig(channels=8, blocks=1, se=True, se_ratio=2, policy_planes=2, value_hidden=16)
_PPO = PPOConfig(learning_rate=1e-3, epochs=2, minibatch_size=16, lr_schedule="linear", lr_schedule_updates=10)


def _batch(n=48, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, NUM_ACTIONS), dtype=bool)
    legal = np.stack([rng.choice(NUM_ACTIONS, 4, replace=False) for _ in range(n)])
    mask[np.arange(n)[:, None], legal] = True
    return {
        "obs": torch.from_numpy(rng.standard_normal((n, 46, 9, 9)).astype(np.float32)),
        "mask": torch.from_numpy(mask),
        "action": torch.from_numpy(legal[:, 1].astype(np.int64)),
        "log_prob": torch.full((n,), float(-np.log(4)), dtype=torch.float32),
        "value": torch.zeros(n),
        "advantage": torch.from_numpy(rng.standard_normal(n).astype(np.float32)),
        "return": torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32)),
    }


def _setup(seed):
    torch.manual_seed(seed)
    model = build_model(_MODEL)
    opt = make_optimizer(model, _PPO)
    return model, opt, make_scheduler(opt, _PPO)


def _train(model, opt, sch, batch, updates):
    for _ in range(updates):
        ppo_update(model, opt, sch, batch, _PPO, "cpu", amp=False)
    # the stored RNG states cover numpy and python too
    return np.random.random(), random.random()


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    batch = _batch()
    model, opt, sch = _setup(0)
    np.random.seed(3)
    random.seed(3)
    _train(model, opt, sch, batch, 2)
    path = tmp_path / checkpoint_name(3)
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sch, version=3, updates=2,
                    config_json=Config().to_json(), extra={"run": "t", "n": 1})
    after_a = _train(model, opt, sch, batch, 2)
    params_a = [t.clone() for t in model.state_dict().values()]
    lr_a = opt.param_groups[0]["lr"]

    model2, opt2, sch2 = _setup(99)  # different init and RNG: everything must come from the file
    info = load_checkpoint(path, model2, opt2, sch2)
    assert info["version"] == 3 and info["updates"] == 2 and info["extra"] == {"run": "t", "n": 1}
    assert info["config_json"] == Config().to_json()
    after_b = _train(model2, opt2, sch2, batch, 2)
    params_b = list(model2.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert opt2.param_groups[0]["lr"] == lr_a
    assert after_a == after_b


def test_checkpoint_loads_with_weights_only_and_model_from_checkpoint(tmp_path):
    model, opt, sch = _setup(0)
    cfg = Config(model=_MODEL)
    path = save_checkpoint(tmp_path / checkpoint_name(1), model=model, optimizer=opt, scheduler=sch,
                           version=1, updates=0, config_json=cfg.to_json())
    state = torch.load(path, weights_only=True)
    assert state["version"] == 1
    raw = read_checkpoint(path)
    assert set(raw) >= {"model", "optimizer", "scheduler", "rng", "config_json"}
    m2, info = load_model_from_checkpoint(path)
    assert not m2.training and info["config"].model == _MODEL
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_latest_prune_and_atomic_names(tmp_path):
    model, opt, sch = _setup(0)
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for v in (1, 2, 10, 3):
        save_checkpoint(tmp_path / checkpoint_name(v), model=model, optimizer=opt, scheduler=sch,
                        version=v, updates=v, config_json="{}")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path).name == "ckpt_00000010.pt"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003.pt", "ckpt_00000010.pt", "notes.txt"]
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)


def test_bad_checkpoints_raise(tmp_path):
    model, opt, sch = _setup(0)
    bad = tmp_path / "ckpt_00000001.pt"
    bad.write_bytes(b"definitely not a zip file")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad, model)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nope.pt", model)
    other = build_model(ModelConfig(channels=4, blocks=0, se=False, policy_planes=1, value_hidden=8))
    path = save_checkpoint(tmp_path / "ckpt_00000002.pt", model=other, optimizer=None, scheduler=None,
                           version=2, updates=0, config_json="{}")
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model)
    # a pickle of an arbitrary object is refused by weights_only loading
    evil = tmp_path / "ckpt_00000003.pt"
    torch.save({"format": 1, "model": {}, "obj": object()}, evil)
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)


def test_weights_bytes_float32_round_trip():
    model, _, _ = _setup(0)
    model.train()
    model(torch.randn(4, 46, 9, 9))
    data = weights_to_bytes(model, "float32")
    other, _, _ = _setup(1)
    load_weights_bytes(other, data)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_bytes_bfloat16_round_trip():
    model, _, _ = _setup(0)
    data16 = weights_to_bytes(model, "bfloat16")
    data32 = weights_to_bytes(model, "float32")
    assert len(data16) < 0.6 * len(data32)
    other, _, _ = _setup(1)
    load_weights_bytes(other, data16)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert b.dtype == a.dtype, k
        if a.is_floating_point():
            assert torch.equal(a.to(torch.bfloat16).to(a.dtype), b), k
        else:
            assert torch.equal(a, b), k


def test_bad_weights_bytes_raise_value_error():
    model, _, _ = _setup(0)
    before = [t.clone() for t in model.state_dict().values()]
    good = weights_to_bytes(model, "float32")
    for bad in (b"", b"garbage" * 10, good[: len(good) // 2], b"\xff" * 8 + good[8:]):
        with pytest.raises(ValueError):
            load_weights_bytes(model, bad)
    with pytest.raises(ValueError):
        load_weights_bytes(model, "not bytes")  # type: ignore[arg-type]
    other = build_model(ModelConfig(channels=4, blocks=0, se=False, policy_planes=1, value_hidden=8))
    with pytest.raises(ValueError):
        load_weights_bytes(model, weights_to_bytes(other))
    with pytest.raises(ValueError):
        weights_to_bytes(model, "float16")
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_non_finite_weights_are_never_published_nor_loaded():
    model, _, _ = _setup(0)
    good = weights_to_bytes(model, "float32")
    poisoned, _, _ = _setup(0)
    with torch.no_grad():
        next(poisoned.parameters())[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        weights_to_bytes(poisoned)
    tensors = safetensors_load(good)
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("inf")
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(ValueError, match="non-finite"):
        load_weights_bytes(model, safetensors_save(tensors))
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
