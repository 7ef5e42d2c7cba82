"""Data-parallel learners (torch.distributed, gloo on CPU): the update over several ranks is the
update over their union, and every rank ends with bitwise identical parameters."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keisei_stream.config import PPOConfig
from keisei_stream.rl.model import build_model
from keisei_stream.rl.ppo import _minibatches, make_optimizer, ppo_update
from keisei_stream.wire import status
from keisei_stream.wire.keys import Keys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_rank import PPO  # noqa: E402
from procs import assert_accounting_balances, start_learner_ranks, start_worker, wait_for, weights_version  # noqa: E402
from test_ppo import _TINY, _fixed_batch  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, sizes: list[int]) -> list[dict]:
    """Run ``tests/ddp_rank.py`` as ``len(sizes)`` ranks (torchrun's environment variables)."""
    port = _free_port()
    procs = []
    for rank in range(len(sizes)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(sizes)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ddp_rank.py"), str(tmp_path),
                                       ",".join(map(str, sizes))], env=env))
    for p in procs:
        assert p.wait(120) == 0
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(len(sizes))]


def _single_process(n: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(_TINY)
    batch, _ = _fixed_batch(model, n=n)
    cfg = PPOConfig(**PPO)
    ppo_update(model, make_optimizer(model, cfg), None, batch, cfg, "cpu", amp=False)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("sizes", [[40, 56], [96, 0]], ids=["uneven", "one-rank-empty"])
def test_two_gloo_ranks_update_like_one_process_on_the_union(tmp_path, sizes):
    """One minibatch per epoch: the rank-averaged gradient of the sample-weighted losses is the
    gradient of the mean over all 96 positions, whichever way they are split (a rank holding
    nothing takes part with a zero loss)."""
    ranks = _run_ranks(tmp_path, sizes)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # bitwise identical parameters on every rank
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k])
    expected = _single_process(sum(sizes))
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0]["params"][k], v, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    initial = build_model(_TINY).state_dict()
    assert sum(not torch.equal(v, initial[k]) for k, v in expected.items()) > len(expected) // 2  # it trained
    m0, m1 = ranks[0]["metrics"], ranks[1]["metrics"]
    assert m0["samples"] == m1["samples"] == sum(sizes)
    assert m0["minibatches"] == m1["minibatches"] == PPO["epochs"]
    assert m0["policy_loss"] == pytest.approx(m1["policy_loss"])  # reduced over the ranks


def test_minibatches_split_every_rank_into_the_same_number():
    bounds, sizes = _minibatches([100], 0, 32)
    assert bounds == [0, 32, 64, 96, 100] and sizes == [32, 32, 32, 4]
    for rank, n in enumerate([50, 0, 77]):
        b, s = _minibatches([50, 0, 77], rank, 32)
        assert len(b) == len(s) + 1 == 5 and b[0] == 0 and b[-1] == n
        assert sum(s) == 127


# ----------------------------------------------------------------------------------------------
# Two learner ranks under torchrun on a real redis-server, with a real worker
# ----------------------------------------------------------------------------------------------
def _segments(log: Path) -> list[dict[int, str]]:
    """``{version: params sha256}`` per start of the rank (a torchrun restart begins a new one)."""
    out: list[dict[int, str]] = []
    for line in log.read_text().splitlines():
        if " (rank " in line and " pid " in line:
            out.append({})
        m = re.search(r"update \d+ version (\d+) params sha256 ([0-9a-f]{64})", line)
        if m:
            out[-1][int(m.group(1))] = m.group(2)
    return out


def _pid(log: Path) -> int:
    return int(re.findall(r" pid (\d+)\)", log.read_text())[-1])


@pytest.mark.redis
def test_two_ranks_train_one_model_and_survive_kill_9_of_a_rank(tmp_path, redis_server, real_redis):
    """The issue's acceptance for several learners, end to end: versions advance, both ranks
    train, the ranks' parameters are identical after every update, kill -9 of rank 1 makes
    torchrun restart the group from the last checkpoint (pending entries re-read), and the
    accounting balances exactly at the stop."""
    r, run = real_redis, "ddp"
    keys = Keys(run)
    status.set_control(r, keys, "run")
    learner = start_learner_ranks(redis_server.url, run, tmp_path, 2, "--set", "learner.check_sync_every=1")
    worker = start_worker(redis_server.url, run, tmp_path, "w0")
    procs = [learner, worker]
    try:
        logs = tmp_path / run / "logs"

        def ranks_trained():
            shown = status.read_learner_status(r, keys).get("rank_trained_positions")
            return json.loads(shown) if shown else [0, 0]

        wait_for(lambda: weights_version(r, keys) >= 5 and min(ranks_trained()) > 0, 180,
                 "both ranks training", procs)
        os.kill(_pid(logs / "learner-rank1.log"), signal.SIGKILL)
        wait_for(lambda: len(_segments(logs / "learner-rank1.log")) == 2, 120, "torchrun restarting the ranks", procs)
        v = weights_version(r, keys)
        wait_for(lambda: weights_version(r, keys) >= v + 3, 180, "versions after the restart", procs)
        assert "resumed from" in (logs / "learner.log").read_text()
        status.set_control(r, keys, "stop")
        assert worker.wait(60) == 0
        learner.send_signal(signal.SIGTERM)  # the agent forwards it to the ranks, which drain and stop
        learner.wait(180)
        assert status.read_learner_status(r, keys)["state"] == "stopped"
    finally:
        for p in procs:  # torchrun's agent stops its ranks on SIGTERM (they also die with it)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    seg0, seg1 = _segments(logs / "learner.log"), _segments(logs / "learner-rank1.log")
    assert len(seg0) == len(seg1) == 2
    for a, b in zip(seg0, seg1):
        common = a.keys() & b.keys()
        assert len(common) >= 2, (a, b)
        assert all(a[v] == b[v] for v in common)  # bitwise identical parameters after every update
    assert {b"learner-0", b"learner-1"} <= {c["name"] for w in status.read_roster(r, keys)
                                            for c in r.xinfo_consumers(keys.experience(w), keys.group)}
    acc = assert_accounting_balances(r, keys)  # nothing lost: what rank 1 held was re-read after the restart
    assert acc["trained_positions"] > 0
