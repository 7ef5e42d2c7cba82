"""The learner process: consumes experience through the consumer group, runs PPO, publishes weights.

A thin shell: the update is :class:`keisei_stream.rl.trainer.Trainer`'s, the delivery state of
every entry (held, in an update, acknowledged, the epoch it was read in, the recovery after Redis
lost the run's data) is :class:`keisei_stream.wire.consumer.Consumer`'s. :func:`run_learner`
reads top to bottom: :func:`start_learner`, then until SIGTERM/SIGINT

1. :meth:`Learner.receive`: read entries from the consumer group over the workers' streams (own
   pending first, then entries claimed from dead learners, then new ones, within each worker's
   credit); bad entries are dead-lettered by the consumer;
2. :meth:`Learner.check_server`: after an outage, recover from a restart that lost the run's data
   (the consumer's new epoch and ``losses`` entry; config and weights re-published here);
3. :meth:`Learner.ready_updates`: the held entries in updates of about ``ppo.samples_per_update``
   positions, or all of them once the backlog is full and nothing new can arrive;
4. :meth:`Learner.update`: the trainer's update in the training thread (while this thread reads
   and decodes the next entries, :meth:`Learner.prefetch_while`), then acknowledge, publish the
   next version, metrics to every sink, checkpoint;
5. :meth:`Learner.housekeeping`: move the workers' finished games into the ``games`` stream and
   the archive, write the ``learner`` status hash.

On a stop it drains the stream into the last updates, acknowledges, checkpoints and exits. Every
Redis call waits out outages (:mod:`keisei_stream.wire.retry`); a stop during an outage still
writes the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch

from keisei_stream.config import Config
from keisei_stream.rl import distributed
from keisei_stream.rl.checkpoint import checkpoint_name, latest_checkpoint, weights_to_bytes
from keisei_stream.rl.device import gpu_utilisation
from keisei_stream.rl.model import count_parameters, pick_device
from keisei_stream.rl.trainer import Trainer
from keisei_stream.wire import retry
from keisei_stream.wire.archive import GameArchive, Recorder
from keisei_stream.wire.atomic import EpochChanged
from keisei_stream.wire.client import connect
from keisei_stream.experience import concat_batches
from keisei_stream.wire.consumer import Consumer, Delivered
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import write_config
from keisei_stream.wire.weights import publish_weights
from learner.report import MetricsSinks, Report

log = logging.getLogger("keisei.learner")

#: Seconds a stopping learner keeps reading the stream into its last updates.
DRAIN_S = 60.0
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


@dataclass
class Learner:
    """Everything one learner process holds between steps (built by :func:`start_learner`)."""

    cfg: Config
    r: redis.Redis
    keys: Keys
    run_dir: Path
    trainer: Trainer
    consumer: Consumer
    recorder: Recorder
    report: Report
    pool: ThreadPoolExecutor  # one training thread: warm-up, then the updates
    started: float  # time.monotonic() at the start of the process's learner
    rank: int = 0  # of ``world`` data-parallel learners (keisei_stream.rl.distributed); rank 0 publishes
    world: int = 1
    version: int = 1
    updates: int = 0
    trained: int = 0
    stale: int = 0
    skipped_updates: int = 0
    publish_due: bool = False
    first_update_s: float | None = None  # seconds from the start to this process's first update
    last_checkpoint: Path | None = None
    rank_trained: list[int] = field(default_factory=list)  # positions trained by each rank (several ranks)
    failed: bool = False  # a distributed collective failed: exit without a checkpoint (torchrun restarts)

    @property
    def held(self) -> list[Delivered]:
        """Entries read and not yet in an update (the consumer's)."""
        return self.consumer.held

    def warm_up(self) -> None:
        """The trainer's warm-up (:meth:`keisei_stream.rl.trainer.Trainer.warm_up`; several ranks
        compile in step before their first update), logged."""
        log.info("warm-up (torch.compile: %s) took %.1f s", self.cfg.model.compile, self.trainer.warm_up())

    # ------------------------------------------------------------------------------ 1-3. read
    def receive(self, block_ms: int | None = None, training: bool = False) -> None:
        """Read the next entries into the consumer's held entries; ``training``: called by
        :meth:`prefetch_while` (its time is not waiting)."""
        t0, d0 = time.monotonic(), self.consumer.decode_s
        self.consumer.receive(block_ms)
        decode = self.consumer.decode_s - d0
        self.report.add("decode", decode)
        if not training:
            self.report.add("wait", time.monotonic() - t0 - decode)

    def check_server(self) -> None:
        """After an outage, a server that lost the run's data: the consumer records the loss and
        takes the new epoch; config and the current weights are re-published here. After an
        outage with the epoch intact, :meth:`check_failover`. Also retries a publish that a full
        server refused."""
        if self.consumer.check_server():
            self.consumer.recover(self.report.last_accounting, version=self.version)
            if self.rank == 0:
                write_config(self.r, self.keys, self.cfg.to_json())
            self.publish()
            log.error("Redis lost the run's data: new epoch %s, config and weights v%d re-published",
                      self.consumer.epoch, self.version)
        elif self.consumer.outage_checked:
            self.check_failover()
        if self.publish_due:
            self.publish()

    def check_failover(self) -> None:
        """After an outage with the run's epoch intact (rank 0): the server may be a promoted
        replica or one restarted from its files; what it lacks is recorded in ``losses``
        (:meth:`keisei_stream.wire.consumer.Consumer.record_failover`), and a version it lacks is
        published again at once (versions never go backwards for long: workers keep the newer one
        meanwhile)."""
        if self.rank == 0 and self.consumer.record_failover(self.report.last_accounting, self.version) < self.version:
            self.publish_due = True

    def ready_updates(self, force: bool = False) -> list[list[Delivered]]:
        """The held entries that make updates now, in groups of about ``samples_per_update``
        positions (whole entries, in arrival order); the remainder stays held unless ``force`` or
        the backlog is full (then it is one more, smaller update). With several learner ranks each
        update takes ``samples_per_update / ranks`` positions from every rank, and the ranks agree
        on how many (:meth:`keisei_stream.wire.consumer.Consumer.take_updates`)."""
        target = max(1, self.cfg.ppo.samples_per_update // self.world)
        return self.consumer.take_updates(target, force, agree=distributed.all_reduce if self.world > 1 else None)

    def agree_to_stop(self, requested: bool) -> bool:
        """True when this process, or with several learner ranks any rank, was asked to stop (one
        collective: all ranks leave the loop together)."""
        return bool(distributed.all_reduce([float(requested)], op="max")[0])

    # ------------------------------------------------------------------------------ 4. update
    def update(self, entries: list[Delivered]) -> None:
        """One update on ``entries`` (whole batches; the training thread runs it while this thread
        reads ahead), then acknowledge (which frees Redis memory), publish, metrics, checkpoint."""
        batches = [d.batch for d in entries]
        b = concat_batches(batches)
        t0 = time.monotonic()
        compact = self.trainer.take_ahead(batches)  # encoded while the previous update trained (GPU)
        self.report.add("rebuild", time.monotonic() - t0)
        job = self.pool.submit(self.trainer.update, b, self.version, compact)
        self.prefetch_while(job)
        upd = job.result()
        m = upd.metrics
        self.report.add("rebuild", m.pop("rebuild_s", 0.0))
        self.report.add("train", m.pop("train_s", 0.0))
        if m.get("minibatches") == 0:
            self.skipped_updates += 1
            log.error("update skipped: every minibatch had a non-finite loss or gradient (%d positions)",
                      int(m["trained_positions"]))
        self.check_server()  # an outage during the update may have been a restart: never ack into it blindly
        t0 = time.monotonic()
        entry_of = np.repeat(np.arange(len(entries)), [d.batch.num_positions for d in entries])
        self.consumer.settle(entries, np.bincount(entry_of, weights=upd.keep, minlength=len(entries)).astype(np.int64))
        self.report.add("ack", time.monotonic() - t0)
        if upd.stepped:
            self.version += 1
            self.updates += 1
            self.publish()
            if self.first_update_s is None:
                self.first_update_s = m["time_to_first_update_s"] = time.monotonic() - self.started
        self.trained += int(upd.keep.sum())
        self.stale += int((~upd.keep).sum())
        if self.world > 1:
            self.rank_trained = distributed.all_gather_int(self.trained)
            if upd.stepped and self.cfg.learner.check_sync_every and self.updates % self.cfg.learner.check_sync_every == 0:
                log.info("update %d version %d params sha256 %s", self.updates, self.version,
                         distributed.check_in_sync(self.trainer.model))
        if self.world > 1:
            m["ranks"] = float(self.world)
        m["skipped_updates"] = float(self.skipped_updates)
        m = self.report.update(m, self.updates, self.version, upd.stepped, backlog=self.consumer.backlog_seen)
        self.write_status("training", backlog=int(m["backlog"]))
        if upd.stepped and self.updates % self.cfg.learner.checkpoint_every == 0:
            self.checkpoint()

    def prefetch_while(self, job: Future) -> None:
        """While ``job`` trains, read, decode and validate the next entries (at least one read;
        short blocking reads, so the update's end is not delayed). Only this thread touches the
        consumer and Redis meanwhile, only the training thread the model. With
        ``learner.prefetch`` off it only waits."""
        if not self.cfg.learner.prefetch:
            wait([job])
            return
        while True:
            n = len(self.held)
            self.receive(block_ms=PREFETCH_BLOCK_MS, training=True)
            self.report.add("rebuild", self.trainer.encode_ahead([d.batch for d in self.held]))
            if job.done():
                return
            if len(self.held) == n:
                wait([job], timeout=PREFETCH_BLOCK_MS / 1000)
                if job.done():
                    return

    def publish(self) -> None:
        """Publish the current weights as :attr:`version` (rank 0 only: every rank holds the same);
        when Redis is full, try again next loop."""
        if self.rank != 0:
            return
        t0 = time.monotonic()
        data = weights_to_bytes(self.trainer.model, self.cfg.stream.weights_dtype)
        try:
            publish_weights(self.r, self.keys, self.version, data, self.cfg.stream.weights_dtype,
                            self.cfg.stream.weights_keep, epoch=self.consumer.epoch, wait=self.consumer.wait)
            self.publish_due = False
            self.consumer.published(self.version)  # entries claiming newer versions are hostile
        except EpochChanged:  # the server lost the run's data: check_server recovers and publishes again
            self.consumer.epoch_refused()
        except redis.ResponseError as exc:
            if not retry.is_oom(exc):  # full and no flagged scripts (Redis < 7): try again next loop
                raise
            if not self.publish_due:
                log.warning("Redis is full, version %d not yet published (retrying): %s", self.version, exc)
            self.publish_due = True
        self.report.add("publish", time.monotonic() - t0)

    def checkpoint(self) -> None:
        """Save ``ckpt_{version}.pt`` (atomic) and prune old ones (rank 0 only)."""
        if self.rank == 0:
            self.last_checkpoint = self.trainer.checkpoint(self.run_dir / "checkpoints", self.version, self.updates,
                                                           self.cfg.learner.keep_checkpoints, {"run": self.cfg.run.id})

    # ------------------------------------------------------------------------------ 5. housekeeping
    def housekeeping(self, force: bool = False) -> None:
        """Move the workers' finished games into the ``games`` stream and archive them (the
        recorder flushes when due), and write the status hash every ``stream.heartbeat_s`` (rank
        0, for all ranks)."""
        if self.rank != 0:
            return
        self.recorder.step(self.consumer.workers, force=force)
        if force or self.report.status_due():
            self.write_status("collecting" if self.held else "waiting")

    def write_status(self, state: str, backlog: int | None = None, wait: bool = False) -> None:
        """The ``learner`` hash: state, version, held positions, backlog (entries in the workers'
        streams at the consumer's last refresh, unless the caller gives it), the games in flight it follows, the workers it
        reads and those live, time to the first update; with several ranks ``ranks`` and
        ``rank_trained_positions`` too (rank 0 writes it for all). Written by the report's own
        thread (:meth:`learner.report.Report.status`); ``wait``: before this returns."""
        c = self.consumer
        fields = {"state": state, "version": self.version, "updates": self.updates, "consumer": c.name,
                  "device": str(self.trainer.device), "epoch": c.epoch, "held_positions": c.held_positions(),
                  "backlog": c.backlog_seen if backlog is None else backlog, "games_in_flight": len(c.games),
                  "workers_read": len(c.workers), "workers_live": len(c.live),
                  "games_archived": self.recorder.archived, "time_to_first_update_s": self.first_update_s,
                  "compile": self.trainer.compiling.state if self.trainer.compiling is not None else
                  ("on" if self.cfg.model.compile else "off")}
        if self.world > 1:
            fields.update({"ranks": self.world, "rank_trained_positions": json.dumps(self.rank_trained)})
        fields["gpu_util_pct"] = gpu_utilisation(self.trainer.device)
        self.report.status(fields, wait=wait)

    # ------------------------------------------------------------------------------ stop
    def drain(self, seconds: float = DRAIN_S) -> None:
        """Read what is left in the stream (bounded: producers may still be running)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.consumer.receive():
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
            self.write_status("stopped", wait=True)
        except retry.TRANSIENT_ERRORS as exc:
            log.warning("Redis unreachable at stop, final status not written: %s", exc)
        self.report.close()
        self.pool.shutdown()
        log.info("learner stopped at version %d after %d updates; checkpoint %s", self.version, self.updates,
                 self.last_checkpoint)
        run_dir = str(self.run_dir.resolve())
        for handler in [h for h in log.handlers if getattr(h, "baseFilename", "").startswith(run_dir)]:
            log.removeHandler(handler)  # the run's log file (a test may start several learners in one process)
            handler.close()
        if not self.failed:
            distributed.shutdown()
        return LearnerResult(self.version, self.updates, self.trained, self.stale, self.last_checkpoint)


def start_learner(cfg: Config, redis_url: str, *, consumer_name: str | None, resume: bool, quiet: bool) -> Learner:
    """Run directory, the trainer (from the newest checkpoint on ``resume``), Redis (config,
    epoch), the first published version; with ``model.compile`` the compiler starts in a thread
    of its own and the updates run eagerly until it is ready (one rank; several ranks compile
    together before their first update).

    Under torchrun (``WORLD_SIZE > 1``) this process is one rank of a data-parallel learner:
    it joins the process group, takes rank 0's whole training state, reads the group as
    consumer ``{consumer_name}-{rank}``; only rank 0 writes config, weights, status and
    checkpoints. A group restarted by torchrun always resumes."""
    started = time.monotonic()
    device = distributed.init_from_env(pick_device(cfg.learner.device), cfg.learner.dist_timeout_s)
    rank, world = distributed.rank(), distributed.world_size()
    consumer_name = f"{consumer_name or 'learner'}-{rank}" if world > 1 else consumer_name or "learner-0"
    run_dir = _open_run_dir(cfg, rank)
    r, keys = connect(redis_url), Keys(cfg.run.id)
    trainer = Trainer.build(cfg, device)
    path = latest_checkpoint(run_dir / "checkpoints") if (resume or distributed.restarted()) and rank == 0 else None
    latest = r.hget(keys.weights_latest, "version") if rank == 0 else None
    version, updates = trainer.start_state(path, None if latest is None else int(latest))
    if path is not None:
        log.info("resumed from %s (version %d, %d updates)", path, version, updates)
    elif resume and rank == 0:
        log.warning("--resume: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
    trainer.wrap(compile_ahead=world == 1)  # one rank: compiled in the background, eager until then
    consumer = Consumer(r, keys, consumer_name, max_plies=cfg.env.max_plies, window=cfg.stream.max_backlog,
                        block_ms=cfg.stream.block_ms, count=cfg.stream.read_count,
                        claim_idle_ms=cfg.stream.claim_idle_ms, deadletter_maxlen=cfg.stream.deadletter_maxlen,
                        refresh_s=cfg.stream.learner_refresh_s, publishes=rank == 0,
                        wait=(cfg.stream.wait_replicas, cfg.stream.wait_ms) if cfg.stream.wait_replicas else None)
    lrn = Learner(cfg=cfg, r=r, keys=keys, run_dir=run_dir, trainer=trainer, consumer=consumer,
                  recorder=Recorder(r, keys, GameArchive(run_dir / "games"), consumer=consumer_name,
                                    games_maxlen=cfg.stream.games_maxlen),
                  report=Report(cfg, r, keys, MetricsSinks(cfg, r, keys, run_dir, quiet, primary=rank == 0), rank == 0),
                  pool=ThreadPoolExecutor(max_workers=1, thread_name_prefix="train"), started=started,
                  rank=rank, world=world, version=version, updates=updates)
    consumer.claim_epoch()
    if rank == 0:
        write_config(r, keys, cfg.to_json())
    lrn.publish()
    if world > 1 and cfg.model.compile:  # every rank at once: a collective in another thread would race the loop's
        lrn.warm_up()
    log.info("learner %s (rank %d of %d, pid %d): %d parameters on %s, version %d (epoch %s)", consumer_name, rank,
             world, os.getpid(), count_parameters(trainer.model), device, lrn.version, consumer.epoch)
    return lrn


def _open_run_dir(cfg: Config, rank: int) -> Path:
    """``runs/{run}`` with ``checkpoints/`` and ``logs/`` (rank 0 writes ``config.yaml``), and the
    rank's log file."""
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
    return run_dir


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
    lrn = start_learner(cfg, redis_url, consumer_name=consumer_name, resume=resume, quiet=quiet)
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
