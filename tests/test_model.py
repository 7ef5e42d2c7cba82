"""Model: shapes, dtypes, value range, sizes of the shipped configs, device selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from keisei_stream.config import ModelConfig, load_config
from keisei_stream.model import (
    NUM_ACTIONS,
    ActorCritic,
    build_model,
    count_parameters,
    maybe_compile,
    pick_device,
)
from keisei_stream.policy import act


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: small nets gain nothing from more, and on a loaded 2-core CI machine
    oversubscribed threads made these tests ~5x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_forward_shapes_and_range():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=8, blocks=2, se=True, se_ratio=2, policy_planes=2, value_hidden=16))
    model.eval()
    obs = torch.randn(5, 46, 9, 9) * 3
    logits, value = model(obs)
    assert logits.shape == (5, NUM_ACTIONS) and logits.dtype == torch.float32
    assert value.shape == (5,) and value.dtype == torch.float32
    assert torch.all(value.abs() <= 1.0)
    assert torch.isfinite(logits).all()


def test_initial_policy_is_near_uniform():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=8, blocks=1, se=False, policy_planes=2, value_hidden=16)).eval()
    logits, _ = model(torch.randn(4, 46, 9, 9))
    assert float(logits.detach().std()) < 0.05


@pytest.mark.parametrize("name", ["tiny", "quickstart", "gpu"])
def test_shipped_configs_build(name):
    cfg = load_config(CONFIGS / f"{name}.yaml").model
    model = build_model(cfg)
    n = count_parameters(model)
    policy_fc = cfg.policy_planes * 81 * NUM_ACTIONS + NUM_ACTIONS
    assert n > policy_fc
    assert isinstance(model, ActorCritic)


def test_batch_one_and_eval_mode_deterministic():
    torch.manual_seed(1)
    model = build_model(ModelConfig(channels=8, blocks=1, se=True, policy_planes=2, value_hidden=16)).eval()
    obs = torch.randn(3, 46, 9, 9)
    with torch.inference_mode():
        full_logits, full_value = model(obs)
        one_logits, one_value = model(obs[1:2])
    torch.testing.assert_close(one_logits[0], full_logits[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_value[0], full_value[1], rtol=1e-5, atol=1e-5)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    with pytest.raises(ValueError):
        pick_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            pick_device("cuda")


def test_maybe_compile_off_returns_model():
    cfg = ModelConfig(channels=8, blocks=0, se=False, policy_planes=1, value_hidden=8, compile=False)
    model = build_model(cfg)
    assert maybe_compile(model, cfg) is model


def test_act_numpy_in_out():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=8, blocks=1, se=False, policy_planes=1, value_hidden=8)).eval()
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((6, 46, 9, 9)).astype(np.float32)
    mask = rng.random((6, NUM_ACTIONS)) < 0.01
    mask[:, 5] = True
    actions, logp, value = act(model, obs, mask, 1.0, generator=torch.Generator().manual_seed(0))
    assert actions.dtype == np.int64 and logp.dtype == np.float32 and value.dtype == np.float32
    assert actions.shape == logp.shape == value.shape == (6,)
    assert mask[np.arange(6), actions].all()
    assert np.all(logp <= 0) and np.all(np.abs(value) <= 1)
    again = act(model, obs, mask, 1.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(actions, again[0])
    greedy, glogp, _ = act(model, obs, mask, 0.0)
    assert mask[np.arange(6), greedy].all() and np.all(glogp == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_forward_and_act():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=16, blocks=2, se=True, policy_planes=2, value_hidden=16)).cuda().eval()
    obs = torch.randn(8, 46, 9, 9, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, value = model(obs)
    assert logits.dtype == torch.float32 and value.dtype == torch.float32
    mask = np.zeros((8, NUM_ACTIONS), dtype=bool)
    mask[:, [3, 70, 13000]] = True
    actions, _, _ = act(model, obs.cpu().numpy(), mask, 1.0, generator=torch.Generator().manual_seed(0), amp=True)
    assert mask[np.arange(8), actions].all()
