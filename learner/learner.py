"""The learner: consumes experience through the consumer group, runs PPO, publishes weights.

Read top to bottom: resolve the run directory and device, build the model (from the latest
checkpoint on ``--resume``), write the run's config to Redis, publish the first weights version,
then loop { read entries (own pending first, then claimed, then new), once ``samples_per_update``
fresh positions are held: rebuild observations and masks, GAE per game, PPO, publish the next
version, acknowledge and delete the entries with the exact accounting, write metrics, checkpoint }.
On SIGTERM/SIGINT it drains the stream into one last update, acknowledges, checkpoints and exits.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from keisei_stream.rl.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    weights_to_bytes,
)
from keisei_stream.wire.codec import ExperienceBatch, concat_batches
from keisei_stream.config import Config
from keisei_stream.wire.embedded_redis import connect
from keisei_stream.wire.consumer import Consumer
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import append_metrics, write_learner_status
from keisei_stream.wire.weights import publish_weights
from keisei_stream.rl.model import build_model, count_parameters, maybe_compile, pick_device
from keisei_stream.rl.ppo import compute_gae, filter_stale, make_optimizer, make_scheduler, ppo_update
from keisei_stream.shogi import EndReason, encode_positions

log = logging.getLogger("keisei.learner")


@dataclass
class LearnerResult:
    """What a learner run did (returned for tests and ``keisei run``)."""

    version: int
    updates: int
    trained_positions: int
    stale_positions: int
    checkpoint: Path | None


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def _game_stats(b: ExperienceBatch) -> dict[str, float]:
    """Win/draw rates and game length of the games in ``b`` (from their end reasons)."""
    reasons = b.reason.astype(np.int64)
    results = b.result.astype(np.int64)
    lengths = np.diff(b.game_offsets.astype(np.int64))
    g = max(len(reasons), 1)
    return {
        "games": float(len(reasons)),
        "game_plies_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "decisive_rate": float((results != 0).sum() / g),
        "draw_rate": float((results == 0).sum() / g),
        "black_win_rate": float((results > 0).sum() / g),
        "checkmate_rate": float((reasons == EndReason.CHECKMATE).sum() / g),
        "max_plies_rate": float((reasons == EndReason.MAX_PLIES).sum() / g),
        "repetition_rate": float(np.isin(reasons, [EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK]).sum() / g),
    }


def run_learner(
    cfg: Config,
    redis_url: str,
    *,
    resume: bool = False,
    consumer_name: str = "learner-0",
    max_updates: int | None = None,
    quiet: bool = False,
) -> LearnerResult:
    """Run the learner until SIGTERM/SIGINT or ``max_updates`` updates.

    Args:
        cfg: the resolved run config (``cfg.run.id`` names the keys and the run directory).
        redis_url: ``redis://...`` or ``unix:///path/redis.sock``.
        resume: continue from the newest checkpoint in ``runs/{run}/checkpoints`` (versions continue).
        consumer_name: consumer name in the group ``learners``; keep it stable across restarts so a
            restarted learner re-reads its own pending entries first.
        max_updates: stop after this many updates in this process (tests).
        quiet: no per-update console line.

    Returns:
        A :class:`LearnerResult`.
    """
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run_dir = Path(cfg.run.dir) / cfg.run.id
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    handler = logging.FileHandler(run_dir / "logs" / "learner.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)

    if cfg.learner.threads:
        torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    device = pick_device(cfg.learner.device)
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.ppo)
    scheduler = make_scheduler(optimizer, cfg.ppo)
    train_model = maybe_compile(model, cfg.model)  # shares parameters with `model`

    keys = Keys(cfg.run.id)
    r = connect(redis_url)
    version, updates = 1, 0
    if resume:
        path = latest_checkpoint(ckpt_dir)
        if path is not None:
            info = load_checkpoint(path, model, optimizer, scheduler, map_location=device)
            version, updates = int(info["version"]), int(info["updates"])
            log.info("resumed from %s (version %d, %d updates)", path, version, updates)
        else:
            log.warning("--resume: no checkpoint in %s, starting fresh", ckpt_dir)
    latest = r.hget(keys.weights_latest, "version")
    if latest is not None and int(latest) >= version:
        # Versions only ever grow: workers load a version only when it is newer than theirs.
        version = int(latest) + 1
    r.set(keys.config, cfg.to_json())

    def publish() -> None:
        data = weights_to_bytes(model, cfg.stream.weights_dtype)
        publish_weights(r, keys, version, data, cfg.stream.weights_dtype, cfg.stream.weights_keep)

    def checkpoint() -> Path:
        path = ckpt_dir / checkpoint_name(version)
        save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, version=version,
                        updates=updates, config_json=cfg.to_json(), extra={"run": cfg.run.id})
        prune_checkpoints(ckpt_dir, cfg.learner.keep_checkpoints)
        return path

    publish()
    log.info("learner %s: %d parameters on %s, published version %d", consumer_name,
             count_parameters(model), device, version)

    tb = None
    if cfg.learner.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
    wandb_run = None
    if cfg.learner.wandb:
        try:
            import wandb

            wandb_run = wandb.init(project=cfg.learner.wandb_project, name=cfg.run.id,
                                   config=json.loads(cfg.to_json()), resume="allow")
        except ImportError:
            log.warning("learner.wandb is set but wandb is not installed")
    console = None
    if not quiet:
        from rich.console import Console

        console = Console()

    consumer = Consumer(
        r, keys, consumer_name, max_plies=cfg.env.max_plies, block_ms=cfg.stream.block_ms,
        count=cfg.stream.read_count, claim_idle_ms=cfg.stream.claim_idle_ms,
        deadletter_maxlen=cfg.stream.deadletter_maxlen,
    )
    held: list = []  # Delivered entries waiting for the next update
    held_fresh = 0  # their positions within max_policy_lag of the current version
    totals = {"trained": 0, "stale": 0}
    last_update_t = time.monotonic()
    last_status_t = 0.0
    last_ckpt: Path | None = None
    last_metrics: dict[str, float] = {}

    def status(state: str, backlog: int | None = None) -> None:
        """Write the ``learner`` hash; ``backlog`` (XLEN of the stream) when already read."""
        fields = {"state": state, "version": version, "updates": updates, "consumer": consumer_name,
                  "device": str(device), "held_positions": sum(d.batch.num_positions for d in held),
                  "backlog": r.xlen(keys.experience) if backlog is None else backlog,
                  "last_seen": round(time.time(), 3)}
        fields.update({k: round(v, 6) for k, v in last_metrics.items()})
        write_learner_status(r, keys, fields)

    def update(entries: list) -> None:
        """One PPO update on ``entries`` (whole batches), then publish, ack and log."""
        nonlocal version, updates, last_update_t, last_metrics, last_ckpt
        b = concat_batches([d.batch for d in entries])
        values = b.value.astype(np.float32)
        advantages, returns = compute_gae(values, b.game_offsets.astype(np.int64), b.final_rewards(),
                                          cfg.ppo.gamma, cfg.ppo.gae_lambda)
        versions = b.version.astype(np.int64)
        keep = filter_stale(versions, version, cfg.ppo.max_policy_lag)
        n_keep = int(keep.sum())
        n_stale = int(len(keep) - n_keep)
        metrics: dict[str, float] = {}
        if n_keep:
            t0 = time.monotonic()
            obs, mask = encode_positions(b.hcp[keep], b.ply[keep], b.repetition[keep], cfg.env.max_plies)
            rebuild_s = time.monotonic() - t0
            batch = {
                "obs": torch.from_numpy(obs), "mask": torch.from_numpy(mask),
                "action": torch.from_numpy(b.action[keep].astype(np.int64)),
                "log_prob": torch.from_numpy(b.log_prob[keep]),
                "value": torch.from_numpy(values[keep]),
                "advantage": torch.from_numpy(advantages[keep]),
                "return": torch.from_numpy(returns[keep]),
            }
            t0 = time.monotonic()
            metrics = ppo_update(train_model, optimizer, scheduler, batch, cfg.ppo, device, cfg.learner.amp)
            metrics["train_s"] = time.monotonic() - t0
            metrics["rebuild_s"] = rebuild_s
            lag = version - versions[keep]
            metrics["policy_lag_mean"] = float(lag.mean())
            metrics["policy_lag_max"] = float(lag.max())
            version += 1
            updates += 1
            publish()
        consumer.ack(entries, trained_positions=n_keep, stale_positions=n_stale)
        totals["trained"] += n_keep
        totals["stale"] += n_stale
        now = time.monotonic()
        metrics.update(_game_stats(b))
        metrics.update({"trained_positions": float(n_keep), "stale_positions": float(n_stale),
                        "samples_per_s": n_keep / max(now - last_update_t, 1e-9)})
        last_update_t = now
        last_metrics = metrics
        backlog = r.xlen(keys.experience)  # unacknowledged entries: acknowledged ones are deleted
        metrics["backlog"] = float(backlog)
        if n_keep:
            append_metrics(r, keys, {"version": version, "updates": updates, **metrics},
                           cfg.stream.metrics_maxlen)
            if tb is not None:
                for k, v in metrics.items():
                    tb.add_scalar(k, v, updates)
                tb.flush()
            if wandb_run is not None:
                wandb_run.log(metrics, step=updates)
            line = (f"v{version} upd {updates} | {metrics['samples_per_s']:.0f} samples/s | "
                    f"backlog {metrics['backlog']:.0f} | lag {metrics['policy_lag_mean']:.2f} | "
                    f"pi {metrics['policy_loss']:.4f} "
                    f"v {metrics['value_loss']:.4f} H {metrics['entropy']:.3f} kl {metrics['approx_kl']:.4f} | "
                    f"games {metrics['games']:.0f} win B/W {metrics['black_win_rate']:.2f}/"
                    f"{metrics['decisive_rate'] - metrics['black_win_rate']:.2f} draw {metrics['draw_rate']:.2f} "
                    f"plies {metrics['game_plies_mean']:.0f} | stale {n_stale}")
            log.info(line)
            if console is not None:
                console.print(line, highlight=False)
            if updates % cfg.learner.checkpoint_every == 0:
                last_ckpt = checkpoint()
        status("training", backlog)

    while not stop.requested:
        delivered = consumer.read()
        for d in delivered:
            held.append(d)
            fresh = filter_stale(d.batch.version.astype(np.int64), version, cfg.ppo.max_policy_lag)
            held_fresh += int(fresh.sum())
        if held and held_fresh >= cfg.ppo.samples_per_update:
            update(held)
            held, held_fresh = [], 0
            if max_updates is not None and updates >= max_updates:
                break
        if time.monotonic() - last_status_t > cfg.stream.heartbeat_s:
            status("waiting" if not held else "collecting")
            last_status_t = time.monotonic()

    # --- shutdown: drain what is left into one last update, acknowledge, checkpoint -----------
    if stop.requested:  # drain: bounded, in case producers are still running
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            delivered = consumer.read()
            if not delivered:
                break
            held.extend(delivered)
    if held:
        update(held)
    if last_ckpt is None or last_ckpt.name != checkpoint_name(version):  # not written by the last update
        last_ckpt = checkpoint()
    status("stopped")
    if tb is not None:
        tb.close()
    if wandb_run is not None:
        wandb_run.finish()
    log.info("learner stopped at version %d after %d updates; checkpoint %s", version, updates, last_ckpt)
    log.removeHandler(handler)
    return LearnerResult(version, updates, totals["trained"], totals["stale"], last_ckpt)
