"""The learner: consumes experience through the consumer group, runs PPO, publishes weights.

:func:`run_learner` reads top to bottom. :meth:`Learner.start` builds the model (from the newest
checkpoint on ``--resume``), writes the run's config to Redis and publishes the first weights
version; then the loop repeats five named steps until SIGTERM/SIGINT:

1. :meth:`Learner.receive`: read entries from the consumer group (own pending first, then entries
   claimed from dead learners, then new ones); bad entries are dead-lettered by the consumer.
2. :meth:`Learner.check_server`: after a Redis outage, detect a restart that lost data (the run's
   ``epoch`` key is gone or changed): recreate the group, re-publish config and weights, record a
   ``losses`` entry, and never acknowledge the old server's entries into the new accounting.
3. :meth:`Learner.ready_updates`: split what is held into updates of about
   ``ppo.samples_per_update`` positions, or take all of it once the backlog is full and nothing new
   can arrive (so the run always makes progress, whatever the share of stale positions).
4. :meth:`Learner.update`: per game GAE, drop positions older than ``max_policy_lag``, then in
   the training thread rebuild observations and masks (on a GPU: compact on the host, dense on
   the device) and one decoupled-PPO update, while this thread reads and decodes the next entries
   (:meth:`Learner.prefetch_while`); acknowledge (which frees Redis memory), publish the next
   version, metrics to every sink, checkpoint.
5. :meth:`Learner.housekeeping`: archive finished games, write the ``learner`` status hash.

On a stop it drains the stream into the last updates, acknowledges, checkpoints and exits. Every
Redis call waits out outages (:mod:`keisei_stream.wire.retry`); a stop during an outage still
writes the final checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from keisei_stream.config import Config
from keisei_stream.rl import distributed
from keisei_stream.rl.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    weights_to_bytes,
)
from keisei_stream.rl.inputs import compact_nbytes, expand_inputs
from keisei_stream.rl.model import (
    build_model,
    count_parameters,
    maybe_compile,
    pick_device,
)
from keisei_stream.rl.ppo import (
    compute_gae,
    filter_stale,
    make_optimizer,
    make_scheduler,
    ppo_update,
    proximal_pass,
)
from keisei_stream.shogi import EndReason, encode_positions, encode_positions_compact
from keisei_stream.wire import retry
from keisei_stream.wire.archive import GameArchive, Recorder
from keisei_stream.wire.atomic import EpochChanged
from keisei_stream.wire.codec import ExperienceBatch, concat_batches
from keisei_stream.wire.consumer import Consumer, Delivered, ensure_group
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import (
    append_losses,
    append_metrics,
    read_accounting,
    write_config,
    write_learner_status,
)
from keisei_stream.wire.weights import publish_weights

log = logging.getLogger("keisei.learner")

#: Seconds a stopping learner keeps reading the stream into its last updates.
DRAIN_S = 60.0
#: Time shares reported per update (seconds since the previous update, by activity). Decoding
#: the next entries overlaps training (:meth:`Learner.prefetch_while`), so the shares can sum above 1.
PHASES = ("wait", "decode", "rebuild", "train", "ack", "publish")
#: XREADGROUP BLOCK (ms) of the reads made while an update trains.
PREFETCH_BLOCK_MS = 20


@dataclass
class LearnerResult:
    """What a learner run did (returned for tests and ``keisei run``)."""

    version: int
    updates: int
    trained_positions: int
    stale_positions: int
    checkpoint: Path | None


class MetricsSinks:
    """Where each update's metrics go, behind one call: the ``metrics`` stream, TensorBoard, W&B
    and the console/log line.

    Args:
        cfg: the run config (``learner.tensorboard``, ``learner.wandb``...). r, keys: the run's Redis.
        run_dir: ``runs/{run}`` (TensorBoard writes to ``tensorboard/`` in it). quiet: no console line.
        primary: rank 0 of several learners (or the only one); the other ranks only log the line.
    """

    def __init__(self, cfg: Config, r: redis.Redis, keys: Keys, run_dir: Path, quiet: bool, primary: bool = True):
        self.cfg, self.r, self.keys, self.primary = cfg, r, keys, primary
        self.console = None if quiet or not primary else Console()
        self.tb = self.wandb = None
        if cfg.learner.tensorboard and primary:
            try:  # optional dependency (extra "tensorboard")
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
        if cfg.learner.wandb and primary:
            try:  # optional dependency, not installed by default
                import wandb

                self.wandb = wandb.init(project=cfg.learner.wandb_project, name=cfg.run.id,
                                        config=json.loads(cfg.to_json()), resume="allow")
            except ImportError:
                log.warning("learner.wandb is set but wandb is not installed")

    def emit(self, step: int, version: int, metrics: dict[str, float], line: str) -> None:
        """Send ``metrics`` of update ``step`` (publishing ``version``) everywhere; ``line`` to the console/log."""
        log.info(line)
        if not self.primary:
            return
        fields = {"version": version, "updates": step, **metrics}
        retry.best_effort("metrics entry", append_metrics, self.r, self.keys, fields, self.cfg.stream.metrics_maxlen)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.console is not None:
            self.console.print(line, highlight=False)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def game_stats(b: ExperienceBatch) -> dict[str, float]:
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


def console_line(version: int, updates: int, m: dict[str, float]) -> str:
    """The one-line summary of an update."""
    return (f"v{version} upd {updates} | {m['samples_per_s']:.0f} samples/s | backlog {m['backlog']:.0f} | "
            f"lag {m['policy_lag_mean']:.2f} w {m['is_weight_mean']:.2f} cut {m['is_weight_truncated']:.2f} | "
            f"pi {m['policy_loss']:.4f} v {m['value_loss']:.4f} H {m['entropy']:.3f} kl {m['approx_kl']:.4f} | "
            f"games {m['games']:.0f} win B/W {m['black_win_rate']:.2f}/{m['decisive_rate'] - m['black_win_rate']:.2f} "
            f"draw {m['draw_rate']:.2f} plies {m['game_plies_mean']:.0f} | stale {m['stale_positions']:.0f}")


@dataclass
class Learner:
    """Everything one learner process holds between steps (built by :meth:`start`)."""

    cfg: Config
    r: redis.Redis
    keys: Keys
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module  # torch.compile of ``model`` when asked (shares its parameters)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    consumer: Consumer
    recorder: Recorder
    trainer: ThreadPoolExecutor  # one thread: rebuild + PPO, while the main thread reads ahead
    sinks: MetricsSinks
    consumer_name: str
    rank: int = 0  # of ``world`` data-parallel learners (keisei_stream.rl.distributed); rank 0 publishes
    world: int = 1
    version: int = 1
    updates: int = 0
    epoch: str = ""
    held: list[Delivered] = field(default_factory=list)
    trained: int = 0
    stale: int = 0
    skipped_updates: int = 0
    publish_due: bool = False
    backlog_full: bool = False
    outages_seen: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    last_update_t: float = field(default_factory=time.monotonic)
    last_status_t: float = 0.0
    last_checkpoint: Path | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_accounting: dict[str, int] = field(default_factory=dict)
    rank_trained: list[int] = field(default_factory=list)  # positions trained by each rank (several ranks)
    failed: bool = False  # a distributed collective failed: exit without a checkpoint (torchrun restarts)

    # ------------------------------------------------------------------------------ start
    @classmethod
    def start(cls, cfg: Config, redis_url: str, *, consumer_name: str | None, resume: bool, quiet: bool) -> "Learner":
        """Run directory, model and optimiser (from the newest checkpoint on ``resume``), Redis
        (config, epoch), the first published version.

        Under torchrun (``WORLD_SIZE > 1``) this process is one rank of a data-parallel learner:
        it joins the process group, takes rank 0's whole training state (model, optimiser,
        scheduler, version), reads the group as consumer ``{consumer_name}-{rank}``, and trains a
        ``DistributedDataParallel`` wrapper; only rank 0 writes config, weights, status and
        checkpoints. A group restarted by torchrun always resumes."""
        device = distributed.init_from_env(pick_device(cfg.learner.device), cfg.learner.dist_timeout_s)
        rank, world = distributed.rank(), distributed.world_size()
        resume = resume or distributed.restarted()
        consumer_name = f"{consumer_name or 'learner'}-{rank}" if world > 1 else consumer_name or "learner-0"
        run_dir = Path(cfg.run.dir) / cfg.run.id
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        if rank == 0:
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        handler = logging.FileHandler(run_dir / "logs" / ("learner.log" if rank == 0 else f"learner-rank{rank}.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)

        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        model = build_model(cfg.model).to(device)
        optimizer = make_optimizer(model, cfg.ppo)
        scheduler = make_scheduler(optimizer, cfg.ppo)
        keys = Keys(cfg.run.id)
        r = connect(redis_url)
        version, updates = 1, 0
        if rank == 0:
            path = latest_checkpoint(run_dir / "checkpoints") if resume else None
            if path is not None:
                info = load_checkpoint(path, model, optimizer, scheduler, map_location=device)
                version, updates = int(info["version"]), int(info["updates"])
                log.info("resumed from %s (version %d, %d updates)", path, version, updates)
            elif resume:
                log.warning("--resume: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
            latest = r.hget(keys.weights_latest, "version")
            if latest is not None and int(latest) >= version:
                version = int(latest) + 1  # versions only grow: workers load only newer versions

        if world > 1:  # every rank starts from rank 0's whole state: model, optimiser moments, scheduler, version
            state = None
            if rank == 0:
                buf = io.BytesIO()
                save_checkpoint(buf, model=model, optimizer=optimizer, scheduler=scheduler, version=version,
                                updates=updates, config_json=cfg.to_json())
                state = buf.getvalue()
            state = distributed.broadcast_bytes(state)
            if rank != 0:
                info = load_checkpoint(io.BytesIO(state), model, optimizer, scheduler, map_location=device)
                version, updates = int(info["version"]), int(info["updates"])
        train_model: torch.nn.Module = model
        if world > 1:
            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
        consumer = Consumer(r, keys, consumer_name, max_plies=cfg.env.max_plies, block_ms=cfg.stream.block_ms,
                            count=cfg.stream.read_count, claim_idle_ms=cfg.stream.claim_idle_ms,
                            deadletter_maxlen=cfg.stream.deadletter_maxlen)
        recorder = Recorder(r, keys, GameArchive(run_dir / "games"), consumer=consumer_name)
        lrn = cls(cfg=cfg, r=r, keys=keys, run_dir=run_dir, device=device, model=model,
                  train_model=maybe_compile(train_model, cfg.model), optimizer=optimizer, scheduler=scheduler,
                  consumer=consumer, recorder=recorder,
                  trainer=ThreadPoolExecutor(max_workers=1, thread_name_prefix="train"),
                  sinks=MetricsSinks(cfg, r, keys, run_dir, quiet, primary=rank == 0),
                  consumer_name=consumer_name, rank=rank, world=world, version=version, updates=updates)
        lrn.epoch = lrn.claim_epoch()
        if rank == 0:
            write_config(r, keys, cfg.to_json())
        lrn.publish()
        log.info("learner %s (rank %d of %d, pid %d): %d parameters on %s, version %d (epoch %s)", consumer_name, rank,
                 world, os.getpid(), count_parameters(model), device, lrn.version, lrn.epoch)
        return lrn

    def claim_epoch(self) -> str:
        """The run's epoch on this server: the existing one, or a new random one if the key is
        missing; the consumer acknowledges only into it."""
        self.r.set(self.keys.epoch, secrets.token_hex(8), nx=True)
        self.consumer.epoch = self.r.get(self.keys.epoch).decode()
        return self.consumer.epoch

    # ------------------------------------------------------------------------------ 1. receive
    def receive(self, block_ms: int | None = None, training: bool = False) -> None:
        """Read the next entries into :attr:`held`; notes whether the backlog is full with nothing
        new. ``training``: called by :meth:`prefetch_while` (its time is not waiting, and a lost
        server is handled after the update, which must not publish half-trained weights)."""
        t0, d0 = time.monotonic(), self.consumer.decode_s
        try:
            delivered = self.consumer.read(block_ms)
        except EpochChanged:  # a rejected entry could not be counted: the server lost the run's data
            if not training:  # after the update: check_server sees the outage that came with it
                self.recover_lost_server(None)
            delivered = []
        decode = self.consumer.decode_s - d0
        self.seconds["decode"] += decode
        if not training:
            self.seconds["wait"] += time.monotonic() - t0 - decode
        # entries another learner claimed while this one stalled past claim_idle_ms are its now
        self.held = [d for d in self.held if d.entry_id in self.consumer.in_flight] + delivered
        # Workers add only while fewer than max_backlog entries are unacknowledged: when this
        # learner read nothing new and the stream is at the limit, no more data can come.
        self.backlog_full = bool(self.held) and not delivered and \
            self.r.xlen(self.keys.experience) >= self.cfg.stream.max_backlog

    # ------------------------------------------------------------------------------ 2. ready updates
    def ready_updates(self, force: bool = False) -> list[list[Delivered]]:
        """The held entries that make updates now, in groups of about ``samples_per_update``
        positions (whole entries, in arrival order); the remainder stays held unless ``force`` or
        the backlog is full (then it is one more, smaller update).

        With several learner ranks each update takes ``samples_per_update / ranks`` positions from
        every rank, and the ranks agree (one collective) on how many updates to make: as many as
        the rank with the fewest full groups has, or, once some rank is forced or sees a full
        backlog, as many as it takes for every rank to train all it holds (a rank that runs out
        takes part with an empty group)."""
        target = max(1, self.cfg.ppo.samples_per_update // self.world)
        groups, group, n = [], [], 0
        for d in self.held:
            group.append(d)
            n += d.batch.num_positions
            if n >= target:
                groups.append(group)
                group, n = [], 0
        flush = force or self.backlog_full
        if self.world > 1:
            every = groups + ([group] if group else [])
            fewest_full, most, flushing = distributed.all_reduce([-len(groups), len(every), float(flush)], op="max")
            if flushing:
                return every + [[] for _ in range(int(most) - len(every))]
            count = int(-fewest_full)
            self.held = [d for g in groups[count:] for d in g] + group
            return groups[:count]
        if group and flush:
            groups.append(group)
            group = []
        self.held = group
        return groups

    def agree_to_stop(self, requested: bool) -> bool:
        """True when this process, or with several learner ranks any rank, was asked to stop (one
        collective: all ranks leave the loop together)."""
        return bool(distributed.all_reduce([float(requested)], op="max")[0])

    # ------------------------------------------------------------------------------ 3. update
    def update(self, entries: list[Delivered]) -> None:
        """One update on ``entries`` (whole batches): GAE, staleness, PPO, acknowledge, publish,
        metrics, checkpoint. Positions older than ``max_policy_lag`` versions are counted as
        stale, not trained; an update whose every minibatch was non-finite publishes nothing."""
        cfg = self.cfg
        b = concat_batches([d.batch for d in entries])
        versions = b.version.astype(np.int64)
        keep = filter_stale(versions, self.version, cfg.ppo.max_policy_lag)
        n_keep, n_stale = int(keep.sum()), int((~keep).sum())
        metrics: dict[str, float] = {}
        # with several ranks, all train together when any holds a fresh position (one collective)
        keep_all = n_keep if self.world == 1 else int(distributed.all_reduce([n_keep])[0])
        if keep_all:
            # rebuild + PPO in the training thread; meanwhile this thread reads and decodes the next entries
            job = self.trainer.submit(self.train, b, keep)
            self.prefetch_while(job)
            metrics, input_bytes = job.result()
            lag = self.version - versions[keep]
            lag_sum, n_all = distributed.all_reduce([float(lag.sum()), float(n_keep)])
            (lag_max,) = distributed.all_reduce([float(lag.max()) if n_keep else -1e9], op="max")
            metrics.update({"policy_lag_mean": lag_sum / n_all, "policy_lag_max": lag_max,
                            "input_bytes_per_position": input_bytes / max(n_keep, 1)})
        stepped = bool(keep_all) and metrics.get("minibatches", 0.0) > 0
        if keep_all and not stepped:
            self.skipped_updates += 1
            log.error("update skipped: every minibatch had a non-finite loss or gradient (%d positions)", keep_all)

        self.check_server()  # an outage during the update may have been a restart: never ack into it blindly
        t0 = time.monotonic()
        entry_of = np.repeat(np.arange(len(entries)), [d.batch.num_positions for d in entries])
        self.acknowledge(entries, np.bincount(entry_of, weights=keep, minlength=len(entries)).astype(np.int64))
        self.seconds["ack"] += time.monotonic() - t0
        if stepped:
            self.version += 1
            self.updates += 1
            self.publish()
        self.trained += n_keep
        self.stale += n_stale
        if self.world > 1:
            self.rank_trained = distributed.all_gather_int(self.trained)
            if stepped and cfg.learner.check_sync_every and self.updates % cfg.learner.check_sync_every == 0:
                log.info("update %d version %d params sha256 %s", self.updates, self.version,
                         distributed.check_in_sync(self.model))
        self.record(b, metrics, n_keep, n_stale, stepped)
        if stepped and self.updates % cfg.learner.checkpoint_every == 0:
            self.checkpoint()

    def train(self, b: ExperienceBatch, keep: np.ndarray) -> tuple[dict[str, float], int]:
        """GAE, the rebuild of the inputs and one decoupled-PPO update on the ``keep`` positions of
        ``b`` (in the training thread: it alone touches the model until it returns). Returns the
        metrics and the input bytes that crossed to the device.

        With ``ppo.recompute_values`` (default) the advantages and returns come from the values of
        the model as it is at the start of the update (one no-grad pass over every position of
        the games, which also gives the proximal log-probabilities PPO needs), not from the values
        the workers recorded up to ``max_policy_lag`` versions ago: IMPALA's V-trace targets are
        built from the learner's values too (Espeholt et al. 2018, arXiv:1802.01561, sec. 4.1).
        """
        cfg, n_keep = self.cfg, int(keep.sum())
        t0 = time.monotonic()
        rows = keep if not cfg.ppo.recompute_values else np.ones_like(keep)  # the pass needs every position
        positions = (b.hcp[rows], b.ply[rows], b.repetition[rows], cfg.env.max_plies)
        if self.device.type == "cpu" or not n_keep:  # CPU: the dense arrays directly (2x faster here)
            obs, mask = (torch.from_numpy(a) for a in encode_positions(*positions))
            input_bytes = obs.numel() * 4 + mask.numel()
        else:  # compact inputs cross to the device (~0.5 KB a position instead of 28.4 KB dense)
            compact = encode_positions_compact(*positions)
            obs, mask = expand_inputs(compact, self.device)
            input_bytes = compact_nbytes(compact)
        actions = torch.from_numpy(b.action[rows].astype(np.int64))
        batch = {"log_prob": torch.from_numpy(b.log_prob[keep])}
        t1 = time.monotonic()  # the proximal pass below is training time
        if cfg.ppo.recompute_values and n_keep:
            prox_logp, values_t = proximal_pass(self.model, obs, mask, actions, self.device, cfg.learner.amp,
                                                cfg.ppo.minibatch_size)
            values = values_t.cpu().numpy()
            rows_t = torch.from_numpy(keep).to(obs.device)
            obs, mask, actions = obs[rows_t], mask[rows_t], actions[torch.from_numpy(keep)]
            batch["prox_log_prob"] = prox_logp[rows_t.to(prox_logp.device)]
        else:
            values = b.value.astype(np.float32)
            if cfg.ppo.recompute_values:  # this rank holds no fresh position: nothing to evaluate
                obs, mask, actions = obs[:0], mask[:0], actions[:0]
        advantages, returns = compute_gae(values, b.game_offsets.astype(np.int64), b.final_rewards(),
                                          cfg.ppo.gamma, cfg.ppo.gae_lambda)
        batch.update({"obs": obs, "mask": mask, "action": actions, "value": torch.from_numpy(values[keep]),
                      "advantage": torch.from_numpy(advantages[keep]), "return": torch.from_numpy(returns[keep])})
        metrics = ppo_update(self.train_model, self.optimizer, self.scheduler, batch, cfg.ppo, self.device,
                             cfg.learner.amp)
        self.seconds["rebuild"] += t1 - t0
        self.seconds["train"] += time.monotonic() - t1
        if cfg.ppo.recompute_values and n_keep:  # how far the workers' values were from the start-of-update ones
            metrics["value_staleness"] = float(np.abs(values[keep] - b.value[keep]).mean())
        return metrics, input_bytes

    def prefetch_while(self, job: Future) -> None:
        """While ``job`` trains, read, decode and validate the next entries into :attr:`held` (at
        least one read; short blocking reads, so the update's end is not delayed). Only this thread
        touches the consumer and Redis meanwhile, only the training thread the model. With
        ``learner.prefetch`` off it only waits."""
        if not self.cfg.learner.prefetch:
            wait([job])
            return
        while True:
            n = len(self.held)
            self.receive(block_ms=PREFETCH_BLOCK_MS, training=True)
            if job.done():
                return
            if len(self.held) == n:
                wait([job], timeout=PREFETCH_BLOCK_MS / 1000)
                if job.done():
                    return

    def acknowledge(self, entries: list[Delivered], kept: np.ndarray) -> None:
        """XACK + XDEL the entries with the accounting (``kept``: ``(len(entries),)`` int, the
        positions of each entry trained on; the rest were stale). Entries read from a server that
        has since lost the run's data (another epoch) are not acknowledged: their counts would
        corrupt the new server's accounting."""
        if not entries:  # a rank with nothing in this distributed update
            return
        live = np.array([d.epoch == self.epoch for d in entries], dtype=bool)
        sizes = np.array([d.batch.num_positions for d in entries], dtype=np.int64)
        trained = int(kept[live].sum())
        stale = int(sizes[live].sum()) - trained
        try:
            self.consumer.ack([d for d, ok in zip(entries, live) if ok], trained_positions=trained,
                              stale_positions=stale)
        except EpochChanged:  # the server restarted without our data while we trained on it
            self.recover_lost_server(None)

    def publish(self) -> None:
        """Publish the current weights as :attr:`version` (rank 0 only: every rank holds the same);
        when Redis is full, try again next loop."""
        if self.rank != 0:
            return
        t0 = time.monotonic()
        data = weights_to_bytes(self.model, self.cfg.stream.weights_dtype)
        try:
            publish_weights(self.r, self.keys, self.version, data, self.cfg.stream.weights_dtype,
                            self.cfg.stream.weights_keep, epoch=self.epoch or None)
            self.publish_due = False
            self.consumer.newest_version = self.version  # entries claiming newer versions are hostile
        except EpochChanged:  # the server lost the run's data: recovering publishes again
            self.recover_lost_server(None)
        except redis.ResponseError as exc:
            if not retry.is_oom(exc):  # full and no flagged scripts (Redis < 7): try again next loop
                raise
            if not self.publish_due:
                log.warning("Redis is full, version %d not yet published (retrying): %s", self.version, exc)
            self.publish_due = True
        self.seconds["publish"] += time.monotonic() - t0

    def record(self, b: ExperienceBatch, metrics: dict[str, float], n_keep: int, n_stale: int, stepped: bool) -> None:
        """Game statistics, counts, time shares and backlog into :attr:`last_metrics`; every sink when stepped."""
        now = time.monotonic()
        elapsed = max(now - self.last_update_t, 1e-9)
        metrics.update(game_stats(b))
        if self.world > 1:  # the positions of every rank
            n_keep, n_stale = (int(x) for x in distributed.all_reduce([n_keep, n_stale]))
            metrics["ranks"] = float(self.world)
        metrics.update({"trained_positions": float(n_keep), "stale_positions": float(n_stale),
                        "samples_per_s": n_keep / elapsed, "backlog": float(self.r.xlen(self.keys.experience)),
                        "skipped_updates": float(self.skipped_updates), **retry.OUTAGES.fields()})
        metrics.update({f"time_share_{k}": v / elapsed for k, v in self.seconds.items()})
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.last_update_t = now
        self.last_metrics = metrics
        if stepped:
            self.sinks.emit(self.updates, self.version, metrics, console_line(self.version, self.updates, metrics))
        self.write_status("training", backlog=int(metrics["backlog"]))

    def checkpoint(self) -> Path:
        """Save ``ckpt_{version}.pt`` (atomic) and prune old ones (rank 0 only)."""
        if self.rank != 0:
            return self.run_dir / "checkpoints" / checkpoint_name(self.version)
        path = self.run_dir / "checkpoints" / checkpoint_name(self.version)
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        version=self.version, updates=self.updates, config_json=self.cfg.to_json(),
                        extra={"run": self.cfg.run.id})
        prune_checkpoints(self.run_dir / "checkpoints", self.cfg.learner.keep_checkpoints)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------------------ 4. check server
    def check_server(self) -> None:
        """After an outage, compare the run's ``epoch`` key with ours: missing or changed means the
        server restarted without our data (:meth:`recover_lost_server`). Also retries a publish
        that a full server refused."""
        if retry.OUTAGES.outages != self.outages_seen:
            self.outages_seen = retry.OUTAGES.outages
            epoch = self.r.get(self.keys.epoch)
            if epoch is None or epoch.decode() != self.epoch:
                self.recover_lost_server(None if epoch is None else epoch.decode())
        if self.publish_due:
            self.publish()

    def recover_lost_server(self, found_epoch: str | None) -> None:
        """The server lost the run's data: record what was lost in the ``losses`` stream, recreate
        the consumer group, re-publish config and weights, and never acknowledge the old server's
        entries (held ones are still trained: their data is in memory)."""
        old_epoch = self.epoch
        self.epoch = self.claim_epoch()  # entries read before (held or in an update) keep the old one
        held, held_positions = len(self.consumer.in_flight), sum(self.consumer.in_flight.values())
        self.consumer.reset()
        ensure_group(self.r, self.keys)
        if self.rank == 0:
            write_config(self.r, self.keys, self.cfg.to_json())
        self.publish()
        before = self.last_accounting
        unread = max(0, before.get("produced_positions", 0) - before.get("trained_positions", 0)
                     - before.get("stale_positions", 0) - before.get("rejected_positions", 0)
                     - before.get("duplicate_positions", 0) - held_positions)
        fields = {"time": round(time.time(), 3), "detected_by": self.consumer_name, "old_epoch": old_epoch,
                  "new_epoch": self.epoch, "found_epoch": found_epoch or "", "version": self.version,
                  "held_entries_kept": held, "held_positions_kept": held_positions,
                  "unread_positions_lost": unread, "accounting_before": json.dumps(before)}
        retry.best_effort("losses entry", append_losses, self.r, self.keys, fields)
        log.error("Redis lost the run's data (epoch %s -> %s): config and weights v%d re-published; "
                  "about %d unread positions lost, %d held positions kept", old_epoch, found_epoch,
                  self.version, unread, held_positions)

    # ------------------------------------------------------------------------------ 5. housekeeping
    def housekeeping(self, force: bool = False) -> None:
        """Archive finished games (the recorder flushes when due), and write the status hash every
        ``stream.heartbeat_s``."""
        if self.rank != 0:  # rank 0 archives the games and writes the status of all ranks
            return
        self.recorder.step(force=force)
        if force or time.monotonic() - self.last_status_t >= self.cfg.stream.heartbeat_s:
            self.write_status("collecting" if self.held else "waiting")

    def write_status(self, state: str, backlog: int | None = None) -> None:
        """The ``learner`` hash: state, version, held positions, backlog (``XLEN``, unless the caller
        just read it), outages, last metrics; with several ranks, rank 0 writes it for all of them
        (``ranks``, ``rank_trained_positions``)."""
        self.last_status_t = time.monotonic()
        if self.rank != 0:
            return
        self.last_accounting = read_accounting(self.r, self.keys)
        fields = {"state": state, "version": self.version, "updates": self.updates, "consumer": self.consumer_name,
                  "device": str(self.device), "epoch": self.epoch,
                  "held_positions": sum(d.batch.num_positions for d in self.held),
                  "backlog": self.r.xlen(self.keys.experience) if backlog is None else backlog,
                  "games_archived": self.recorder.archived,
                  "last_seen": round(time.time(), 3), **retry.OUTAGES.fields()}
        if self.world > 1:
            fields.update({"ranks": self.world, "rank_trained_positions": json.dumps(self.rank_trained)})
        fields.update({k: round(v, 6) for k, v in self.last_metrics.items() if k not in fields})
        retry.best_effort("learner status", write_learner_status, self.r, self.keys, fields)

    # ------------------------------------------------------------------------------ stop
    def drain(self, seconds: float = DRAIN_S) -> None:
        """Read what is left in the stream (bounded: producers may still be running)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = len(self.held)
            self.receive()
            if len(self.held) == n:
                break

    def close(self) -> LearnerResult:
        """Final checkpoint (unless the last update wrote it, or a learner rank failed: the group
        restarts from the last one), status and sinks; leaves the process group."""
        if self.failed:
            log.error("a learner rank failed: no final checkpoint (torchrun restarts from %s)", self.last_checkpoint)
        elif self.last_checkpoint is None or self.last_checkpoint.name != checkpoint_name(self.version):
            self.checkpoint()
        try:
            self.housekeeping(force=True)
            self.write_status("stopped")
        except retry.TRANSIENT_ERRORS as exc:
            log.warning("Redis unreachable at stop, final status not written: %s", exc)
        self.sinks.close()
        self.trainer.shutdown()
        log.info("learner stopped at version %d after %d updates; checkpoint %s", self.version, self.updates,
                 self.last_checkpoint)
        run_dir = str(self.run_dir.resolve())
        for handler in [h for h in log.handlers if getattr(h, "baseFilename", "").startswith(run_dir)]:
            log.removeHandler(handler)  # the run's log file (a test may start several learners in one process)
            handler.close()
        if not self.failed:
            distributed.shutdown()
        return LearnerResult(self.version, self.updates, self.trained, self.stale, self.last_checkpoint)


def run_learner(
    cfg: Config,
    redis_url: str,
    *,
    resume: bool = False,
    consumer_name: str | None = None,
    max_updates: int | None = None,
    quiet: bool = False,
) -> LearnerResult:
    """Run the learner until SIGTERM/SIGINT or ``max_updates`` updates.

    Args:
        cfg: the resolved run config (``cfg.run.id`` names the keys and the run directory).
        redis_url: ``redis://...``, ``rediss://...`` or ``unix:///path/redis.sock``.
        resume: continue from the newest checkpoint in ``runs/{run}/checkpoints`` (versions continue).
        consumer_name: consumer name in the group ``learners`` (default ``learner-0``; with several
            ranks ``{name}-{rank}``, default ``learner-{rank}``); keep it stable across restarts so
            a restarted learner re-reads its own pending entries first.
        max_updates: stop after this many updates in this process (tests).
        quiet: no per-update console line.

    Returns:
        A :class:`LearnerResult`.
    """
    stop = retry.StopFlag()
    lrn = Learner.start(cfg, redis_url, consumer_name=consumer_name, resume=resume, quiet=quiet)
    first_update = lrn.updates
    try:
        while True:
            if lrn.agree_to_stop(stop.requested):  # with several ranks: a stop of any rank stops all
                lrn.drain()
                break
            lrn.receive()
            lrn.check_server()
            for entries in lrn.ready_updates():
                lrn.update(entries)
            if max_updates is not None and lrn.updates - first_update >= max_updates:
                break
            lrn.housekeeping()
        for entries in lrn.ready_updates(force=True):
            lrn.update(entries)
    except retry.TRANSIENT_ERRORS as exc:  # only when stopped during an outage
        log.warning("stopped while Redis is unreachable (%s); what is held stays pending in the stream", exc)
    except Exception as exc:
        if lrn.world > 1:  # a rank died or hung: exit, no checkpoint of a half-done update; torchrun restarts all
            lrn.failed = True
            log.error("learner rank %d of %d failed (%s: %s); exiting for torchrun to restart the group",
                      lrn.rank, lrn.world, type(exc).__name__, exc)
        raise
    finally:
        result = lrn.close()
    return result
