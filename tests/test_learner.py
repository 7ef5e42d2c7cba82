"""The learner's steps on a real redis-server: progress is always possible (no stall on stale or
small entries), oversized held data is split into bounded updates, accounting balances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from keisei_stream.config import load_config
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import read_accounting, register_workers
from learner.learner import start_learner

pytestmark = pytest.mark.redis
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _learner(real_redis, redis_server, tmp_path, run, *overrides, workers=("w0",)):
    """A learner on the tiny config (max_plies 64) wanting 256 positions per update, reading
    ``workers``'s streams."""
    register_workers(real_redis, Keys(run), list(workers))
    cfg = load_config(CONFIGS / "tiny.yaml", [f"run.id={run}", f"run.dir={tmp_path}", "stream.block_ms=10",
                                              "ppo.samples_per_update=256", "stream.max_backlog=4",
                                              "stream.batch_positions=64", *overrides])
    return cfg, start_learner(cfg, redis_server.url, consumer_name="learner-0", resume=False, quiet=True)


def _fill(r, keys, make_batch, entries, games, version):
    """Add ``entries`` batches of ``games`` random games each; returns their position counts."""
    p = Producer(r, keys, "w0", credit=100)
    sizes = []
    for i in range(entries):
        b = make_batch(1, num_games=games, seed=i, worker_id="w0", version=version)
        assert p.send(b)
        sizes.append(b.num_positions)
    return sizes


def _receive_all(lrn, rounds=10):
    for _ in range(rounds):
        lrn.receive()


def test_only_stale_entries_do_not_stall_the_run(real_redis, redis_server, tmp_path, make_batch):
    """Held entries all older than max_policy_lag: the old rule (wait for samples_per_update
    *fresh* positions) never updated while workers waited on the full backlog."""
    cfg, lrn = _learner(real_redis, redis_server, tmp_path, "stall", "ppo.max_policy_lag=2")
    keys = Keys("stall")
    lrn.version = 50
    sizes = _fill(real_redis, keys, make_batch, 4, games=4, version=1)
    assert sum(sizes) >= 256
    _receive_all(lrn)
    groups = lrn.ready_updates()  # not forced: stale positions count towards an update
    assert groups
    for group in groups + lrn.ready_updates(force=True):
        lrn.update(group)
    acc = read_accounting(real_redis, keys)
    assert real_redis.xlen(keys.experience("w0")) == 0
    assert acc["stale_positions"] == acc["produced_positions"] == sum(sizes)
    assert acc["trained_positions"] == 0
    lrn.close()


def test_a_full_backlog_of_small_entries_makes_an_update(real_redis, redis_server, tmp_path, make_batch):
    """Entries smaller than batch_positions (a worker's last batch at stop) fill the backlog
    below samples_per_update: the learner trains what it holds instead of waiting forever."""
    cfg, lrn = _learner(real_redis, redis_server, tmp_path, "small", "ppo.samples_per_update=1024",
                        "stream.batch_positions=256")
    keys = Keys("small")
    sizes = _fill(real_redis, keys, make_batch, 4, games=1, version=1)  # 4 entries of one game each
    assert sum(sizes) < 1024
    _receive_all(lrn)
    assert lrn.consumer.backlog_full
    groups = lrn.ready_updates()
    assert [sum(d.batch.num_positions for d in g) for g in groups] == [sum(sizes)]
    v0 = lrn.version
    lrn.update(groups[0])
    assert lrn.version == v0 + 1
    acc = read_accounting(real_redis, keys)
    assert acc["trained_positions"] == acc["produced_positions"] == sum(sizes)
    lrn.close()


def test_oversized_held_data_is_split_into_bounded_updates(real_redis, redis_server, tmp_path, make_batch):
    cfg, lrn = _learner(real_redis, redis_server, tmp_path, "split", "stream.max_backlog=16")
    keys = Keys("split")
    sizes = _fill(real_redis, keys, make_batch, 12, games=1, version=1)
    _receive_all(lrn)
    groups = lrn.ready_updates()
    assert len(groups) >= 2
    for g in groups:  # whole entries; each update holds >= 256 positions and less than one more entry
        n = sum(d.batch.num_positions for d in g)
        assert 256 <= n < 256 + max(d.batch.num_positions for d in g)
    assert sum(d.batch.num_positions for d in lrn.held) < 256  # the remainder waits for more
    for g in groups + lrn.ready_updates(force=True):
        lrn.update(g)
    assert not lrn.held
    acc = read_accounting(real_redis, keys)
    assert acc["trained_positions"] + acc["stale_positions"] == acc["produced_positions"] == sum(sizes)
    lrn.close()


def test_entries_read_before_the_server_lost_its_data_are_never_counted_in_the_new_one(
        real_redis, redis_server, tmp_path, make_batch):
    """Regression (a CI failure): with two updates ready, the server lost the run's data during
    the first; the second update's entries, read from the old server but in neither ``held`` nor
    ``updating``, were acknowledged into the new server's accounting (trained > produced there)."""
    cfg, lrn = _learner(real_redis, redis_server, tmp_path, "amnesia", "stream.max_backlog=16")
    keys = Keys("amnesia")
    _fill(real_redis, keys, make_batch, 12, games=1, version=1)
    _receive_all(lrn)
    groups = lrn.ready_updates()
    assert len(groups) >= 2
    real_redis.flushall()  # the restart without persistence, as the learner sees it
    lrn.consumer.epoch_refused()  # what a refused epoch-checked write reports
    lrn.check_server()
    for g in groups + lrn.ready_updates(force=True):
        lrn.update(g)  # trained (their data is in memory), never acknowledged into the new server
    acc = read_accounting(real_redis, keys)
    assert acc.get("trained_positions", 0) == acc.get("stale_positions", 0) == acc.get("produced_positions", 0) == 0
    loss = real_redis.xrange(keys.losses)[-1][1]
    assert int(loss[b"held_positions_kept"]) == sum(d.batch.num_positions for g in groups for d in g) + \
        sum(d.batch.num_positions for d in lrn.held)
    # entries read from the new server are acknowledged there
    sizes = _fill(real_redis, keys, make_batch, 4, games=2, version=lrn.version)
    _receive_all(lrn)
    for g in lrn.ready_updates(force=True):
        lrn.update(g)
    acc = read_accounting(real_redis, keys)
    assert acc["trained_positions"] + acc["stale_positions"] == acc["produced_positions"] == sum(sizes)
    lrn.close()


def test_the_next_entries_are_read_and_decoded_while_an_update_trains(real_redis, redis_server, tmp_path, make_batch):
    """Prefetch: the main thread reads (and validates) what arrived while the training thread
    runs the update, so the next update does not wait for them."""
    cfg, lrn = _learner(real_redis, redis_server, tmp_path, "prefetch", "stream.max_backlog=16", "learner.prefetch=true",
                        workers=("w0", "w1"))
    keys = Keys("prefetch")
    _fill(real_redis, keys, make_batch, 6, games=1, version=1)
    _receive_all(lrn)
    groups = lrn.ready_updates()
    assert groups and not lrn.consumer.backlog() - sum(len(g) for g in groups) - len(lrn.held)
    p = Producer(real_redis, keys, "w1", credit=100)
    later = [make_batch(1, num_games=1, seed=100 + i, worker_id="w1", version=1) for i in range(3)]
    for b in later:
        assert p.send(b)
    before = {d.key for d in lrn.held}
    lrn.update(groups[0])  # no receive() call: only the prefetch can have read the new entries
    new = [d for d in lrn.held if d.key not in before]
    assert sorted(d.batch.batch_id for d in new) == sorted(b.batch_id for b in later)
    assert lrn.consumer.decode_s > 0
    lrn.close()


@pytest.mark.parametrize("recompute", [True, False])
def test_advantages_come_from_the_values_of_the_model_at_the_start_of_the_update(
        real_redis, redis_server, tmp_path, make_batch, monkeypatch, recompute):
    """ppo.recompute_values: GAE runs on the start-of-update model's values (and PPO gets that
    pass's log-probs), not on the values the workers recorded, which may be versions old."""
    import keisei_stream.rl.trainer as trainer_module
    from keisei_stream.rl.gae import segment_advantages
    from keisei_stream.rl.ppo import proximal_pass
    from keisei_stream.experience import concat_batches
    from keisei_stream.shogi import encode_positions

    cfg, lrn = _learner(real_redis, redis_server, tmp_path, f"values{recompute}", f"ppo.recompute_values={recompute}")
    keys = Keys(f"values{recompute}")
    _fill(real_redis, keys, make_batch, 4, games=2, version=1)
    _receive_all(lrn)
    group = lrn.ready_updates(force=True)[0]
    seen = {}
    real_update = trainer_module.ppo_update
    monkeypatch.setattr(trainer_module, "ppo_update", lambda model, opt, sch, batch, *a: seen.update(batch)
                        or real_update(model, opt, sch, batch, *a))
    b = concat_batches([d.batch for d in group])
    obs, mask = (torch.from_numpy(x) for x in encode_positions(b.hcp, b.ply, b.repetition, cfg.env.max_plies))
    logp, values = proximal_pass(lrn.trainer.model, obs, mask, torch.from_numpy(b.action.astype(np.int64)), "cpu", False, 64)
    lrn.update(group)
    expected = values.numpy() if recompute else b.value.astype(np.float32)
    np.testing.assert_allclose(seen["value"].numpy(), expected, rtol=1e-5, atol=1e-6)
    adv, _, _ = segment_advantages(b, expected, cfg.ppo.gamma, cfg.ppo.gae_lambda)
    np.testing.assert_allclose(seen["advantage"].numpy(), adv, rtol=1e-5, atol=1e-5)
    assert not np.allclose(values.numpy(), b.value)  # the recorded values are not the model's
    if recompute:
        np.testing.assert_allclose(seen["prox_log_prob"].numpy(), logp.numpy(), rtol=1e-5, atol=1e-5)
        assert lrn.report.last_metrics["value_staleness"] > 0
    else:
        assert "prox_log_prob" not in seen
    lrn.close()
