"""Model: shapes, dtypes, value range, sizes of the shipped configs, device selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from keisei_stream.config import ModelConfig, load_config
from keisei_stream.rl.model import (
    NUM_ACTIONS,
    ActorCritic,
    PointerPolicyHead,
    build_model,
    count_parameters,
    maybe_compile,
    pick_device,
)
from keisei_stream.rl.policy import act
from keisei_stream.shogi import usi_to_action

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
@pytest.mark.parametrize("head", ["pointer", "dense"])
def test_shipped_configs_build(name, head):
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"model.policy_head={head}"]).model
    model = build_model(cfg).eval()
    n = count_parameters(model)
    if head == "dense":
        assert n > cfg.policy_planes * 81 * NUM_ACTIONS + NUM_ACTIONS
    else:
        assert n < 4_000_000
    assert isinstance(model, ActorCritic)
    with torch.inference_mode():
        logits, value = model(torch.randn(2, 46, 9, 9))
    assert logits.shape == (2, NUM_ACTIONS) and value.shape == (2,)


def test_pointer_head_scores_match_the_action_layout():
    """Board action (from, to, promote) scores <q_from, k_to>/sqrt(d) of the promote pair; drops
    (piece, to) read drop plane ``piece`` at ``to``. Checked through usi_to_action."""

    torch.manual_seed(0)
    head = PointerPolicyHead(8, 4).eval()
    with torch.no_grad():
        head.bias.normal_()
    h = torch.randn(1, 8, 9, 9)
    with torch.inference_mode():
        logits = head(h)[0]
        q = head.query(h).view(2, 4, 81)
        k = head.key(h).view(2, 4, 81)
        drops = head.drop(h).view(7, 81)

    def sq(name: str) -> int:  # cshogi square index: (file - 1) * 9 + rank, Black = mover's frame
        return (int(name[0]) - 1) * 9 + "abcdefghi".index(name[1])

    for usi in ["7g7f", "2h2b+", "8h2b", "1a9i", "5e5d+"]:
        a = usi_to_action(usi, 0)
        p = 1 if usi.endswith("+") else 0
        f, t = sq(usi[0:2]), sq(usi[2:4])
        expected = float((q[p, :, f] * k[p, :, t]).sum()) / 2.0 + float(head.bias.detach()[a])
        assert abs(float(logits[a]) - expected) < 1e-5, usi
    for usi, piece in [("P*5e", 0), ("R*1a", 6), ("G*9i", 4)]:
        a = usi_to_action(usi, 0)
        expected = float(drops[piece, sq(usi[2:4])]) + float(head.bias.detach()[a])
        assert abs(float(logits[a]) - expected) < 1e-5, usi


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
