"""The self-play worker process: plays games with the current policy and streams their positions.

A thin shell around :class:`keisei_stream.rl.selfplay.SelfPlay` (the games, the batched forward
pass on the worker's device, the segments) and :class:`keisei_stream.wire.producer.Producer` (its
own stream, within the credit the learner gives it). :func:`run_worker` reads top to bottom:
connect, read the run's config from Redis, :meth:`Worker.start`, wait for weights version 1
(never play with random weights), then loop over named steps { obey control, load new weights,
play one step, send a batch once the outbox holds ``stream.batch_positions`` positions (the
producer waits while the worker's stream holds its credit or Redis's memory is full), notice a
Redis restart, heartbeat }. Every Redis call waits out an outage
(:mod:`keisei_stream.wire.retry`); the games and the outbox are kept meanwhile. A worker writes
only keys of its own (:mod:`keisei_stream.ops.acl`); one started with a credential that may
(an admin URL) also puts itself on the run's roster, so that the learner reads its stream.

At a stop every game's unsent positions are cut into segments and sent (waiting up to
:data:`FINAL_SEND_S` seconds for room): nothing played is discarded unless the learner cannot take
it in that time; what is left is counted in the worker's producer record (``discarded``, summed
into the accounting's ``worker_discarded_positions``) and the last heartbeat.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field

import redis
import torch
from redis.exceptions import NoPermissionError

from keisei_stream.config import Config, config_from_json
from keisei_stream.rl.checkpoint import load_weights_bytes
from keisei_stream.rl.model import build_model, pick_device
from keisei_stream.rl.selfplay import Segment, SelfPlay, segments_to_batch
from keisei_stream.shogi import GameRecord
from keisei_stream.wire import retry
from keisei_stream.wire.atomic import EpochWatch
from keisei_stream.wire.client import as_str, connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import CONTROL_S, append_game, get_control, register_workers, write_worker_heartbeat
from keisei_stream.wire.weights import WeightsError, WeightsWatcher, read_latest_weights

log = logging.getLogger("keisei.worker")

#: Seconds a stopping worker waits for room in the stream to send its last positions.
FINAL_SEND_S = 20.0
#: Seconds: time constant of the heartbeat's ``backpressure_share`` (a moving average over about
#: the last half minute, so one snapshot of ``keisei status`` reads the recent share, not the state
#: of the instant: a worker waiting 69 % of a run can be caught playing).
SHARE_TAU_S = 30.0


@dataclass
class WorkerStats:
    """Counters reported in the heartbeat (all since the worker started)."""

    positions_sent: int = 0
    games_sent: int = 0
    batches_sent: int = 0
    positions_played: int = 0
    discarded_positions: int = 0
    server_restarts: int = 0
    games_not_recorded: int = 0
    rate_t0: float = field(default_factory=time.monotonic)
    rate_n0: int = 0
    rate_w0: float = 0.0
    positions_per_s: float = 0.0
    backpressure_share: float = 0.0
    rate_sampled: bool = False

    def update_rate(self, waited_s: float) -> None:
        """Positions/s of self-play over the interval since the last call (at least 1 s), and
        ``backpressure_share``: the share of wall time spent waiting on backpressure, an exponential
        moving average with time constant :data:`SHARE_TAU_S` (the usual EWMA of a rate sampled at
        uneven intervals: weight ``1 - exp(-dt / tau)`` for the newest interval; the first interval
        sets it, so a worker that waits from its start does not read low for half a minute).

        Args:
            waited_s: the producer's total seconds waited so far (credit, room or the server),
                including a wait still in progress.
        """
        now = time.monotonic()
        dt = now - self.rate_t0
        if dt >= 1.0:
            self.positions_per_s = (self.positions_played - self.rate_n0) / dt
            share = min(1.0, max(0.0, (waited_s - self.rate_w0) / dt))
            weight = 1.0 - math.exp(-dt / SHARE_TAU_S) if self.rate_sampled else 1.0  # the first sample starts it
            self.backpressure_share += weight * (share - self.backpressure_share)
            self.rate_sampled = True
            self.rate_t0, self.rate_n0, self.rate_w0 = now, self.positions_played, waited_s


def wait_for_config(r: redis.Redis, keys: Keys, stop: retry.StopFlag, poll_s: float = 0.5) -> Config | None:
    """Block until the learner has written the run's config (or a stop); returns None on stop.

    Raises:
        ConfigError: when the stored config is invalid (the worker cannot play by it).
    """
    while not stop.requested:
        raw = r.get(keys.config)
        if raw is not None:
            return config_from_json(raw)
        if get_control(r, keys) == "stop":
            return None
        time.sleep(poll_s)
    return None


@dataclass
class Worker:
    """Everything one worker process holds between steps (built by :meth:`start`)."""

    cfg: Config
    r: redis.Redis  # the primary: experience, heartbeats, game records, the epoch
    read: redis.Redis  # config, control, weights and their announcements: the host's replica, or r
    keys: Keys
    worker_id: str
    selfplay: SelfPlay
    producer: Producer
    watcher: WeightsWatcher
    stats: WorkerStats = field(default_factory=WorkerStats)
    version: int = 0
    outbox: list[Segment] = field(default_factory=list)
    outbox_positions: int = 0
    control: str = "run"
    control_checked: float = 0.0
    last_beat: float = 0.0
    epoch: EpochWatch = field(default_factory=EpochWatch)
    host: str = field(default_factory=socket.gethostname)

    @classmethod
    def start(cls, cfg: Config, r: redis.Redis, keys: Keys, worker_id: str, *, games: int | None,
              threads: int | None, seed: int | None, device: str | None = None,
              read: redis.Redis | None = None) -> "Worker":
        """Model (random until the first weights arrive) on the worker's device, the games,
        producer (on ``r``) and weights watcher (on ``read``, default ``r``)."""
        torch.set_num_threads(threads or cfg.worker.threads)
        seed = cfg.run.seed + os.getpid() if seed is None else seed
        dev = pick_device(device or cfg.worker.device)
        model = build_model(cfg.model).to(dev).eval()
        selfplay = SelfPlay(model, games=games or cfg.worker.games, max_plies=cfg.env.max_plies,
                            segment_plies=cfg.worker.segment_plies, lookahead_plies=cfg.worker.lookahead_plies,
                            gamma=cfg.ppo.gamma, lam=cfg.ppo.gae_lambda, temperature=cfg.worker.temperature,
                            seed=seed, device=dev, amp=cfg.worker.amp)
        log.info("worker %s: %d games on %s (%d group(s)%s), segments of %d plies sent %d plies later", worker_id,
                 selfplay.num_games, dev, len(selfplay.groups), ", overlapped" if selfplay.overlap else "",
                 cfg.worker.segment_plies, cfg.worker.lookahead_plies)
        raw = r.get(keys.epoch)
        epoch = EpochWatch(None if raw is None else as_str(raw))
        read = r if read is None else read
        return cls(cfg=cfg, r=r, read=read, keys=keys, worker_id=worker_id, selfplay=selfplay,
                   producer=Producer(r, keys, worker_id, cfg.stream.backoff_max_s, epoch=epoch),
                   watcher=WeightsWatcher(read, keys, cfg.stream.weights_poll_s), epoch=epoch)

    def read_control(self) -> str:
        """``run`` / ``pause`` / ``stop``, read at most every
        :data:`keisei_stream.wire.status.CONTROL_S` seconds."""
        now = time.monotonic()
        if now - self.control_checked > CONTROL_S:
            self.control, self.control_checked = get_control(self.read, self.keys), now
        return self.control

    def wait_for_weights(self, stop: retry.StopFlag) -> bool:
        """Block until weights version >= 1 are loaded; False on a stop."""
        while self.version < 1:
            if stop.requested or self.read_control() == "stop":
                return False
            self.load_new_weights()
            if self.version < 1:
                self.heartbeat("waiting_weights")
                time.sleep(0.1)
        return True

    def load_new_weights(self) -> None:
        """Load the newest weights when the watcher saw a newer version (sha256 verified)."""
        announced = self.watcher.poll()
        if announced is None or announced <= self.version:
            return
        try:
            latest = read_latest_weights(self.read, self.keys)
            if latest is None or latest[0] <= self.version:
                return
            load_weights_bytes(self.selfplay.model, latest[2])
        except (WeightsError, ValueError) as exc:  # wrong sha256 or unusable: keep the current weights
            log.error("worker %s: refused weights: %s", self.worker_id, exc)
            return
        self.version = latest[0]
        log.info("worker %s: loaded weights version %d", self.worker_id, self.version)

    def play_step(self) -> None:
        """One move in every game; the segments ready go to the outbox, finished games to the
        games stream."""
        step = self.selfplay.step(self.version)
        self.stats.positions_played += step.positions
        self.queue(step.segments)
        if self.cfg.worker.record_games:
            for record in step.finished:
                self.record_game(record)

    def queue(self, segments: list[Segment]) -> None:
        self.outbox += segments
        self.outbox_positions += sum(s.num_positions for s in segments)

    def record_game(self, record: GameRecord) -> None:
        """The finished game to the worker's own capped game stream (the learner moves it into
        ``games``); skipped while Redis is full, and counted and skipped when the stream refuses
        it (its ids exhausted by this worker's credential): game records never stop self-play."""
        try:
            retry.best_effort("game record", append_game, self.r, self.keys, self.worker_id, record,
                              self.cfg.stream.games_maxlen, version=self.version)
        except redis.ResponseError as exc:
            if not self.stats.games_not_recorded:
                log.error("worker %s: game records refused (%s); counted in the heartbeat", self.worker_id, exc)
            self.stats.games_not_recorded += 1

    def send(self, should_stop, everything: bool = False) -> bool:
        """Send the outbox in entries of about ``stream.batch_positions`` positions (whole
        segments; a smaller rest waits for more unless ``everything``); waits (heartbeating,
        loading weights) while the learner's backlog or Redis is full, asking ``should_stop()``
        before each wait. False when stopped first (the unsent segments stay)."""
        target = self.cfg.stream.batch_positions

        def on_wait(_seconds: float) -> None:  # while backpressure holds us: heartbeat, new weights
            self.heartbeat("backpressure")
            self.load_new_weights()

        while self.outbox and (everything or self.outbox_positions >= target):
            k, n = 0, 0
            while k < len(self.outbox) and n < target:
                n, k = n + self.outbox[k].num_positions, k + 1
            batch = segments_to_batch(self.outbox[:k])
            sent = self.producer.send(batch, should_stop=should_stop, on_wait=on_wait)
            if not sent:
                return False
            self.stats.batches_sent += 1
            self.stats.positions_sent += batch.num_positions
            self.stats.games_sent += batch.games_ended
            self.outbox, self.outbox_positions = self.outbox[k:], self.outbox_positions - n
        return True

    def check_server(self) -> None:
        """After an outage (:class:`~keisei_stream.wire.atomic.EpochWatch`): a missing or changed
        ``epoch`` key means Redis restarted without the run's data (the learner records the loss
        and re-publishes); the worker keeps playing with its weights and counts the restart. With
        the epoch intact the server may be a promoted replica lacking the last adds the old
        primary acknowledged: the producer compares its record with what it wrote and counts
        them as lost (:meth:`keisei_stream.wire.producer.Producer.reconcile`)."""
        if self.epoch.changed(self.r, self.keys):
            self.stats.server_restarts += 1
            log.error("worker %s: Redis lost the run's data (epoch %s -> %s); playing on with version %d",
                      self.worker_id, self.epoch.epoch, self.epoch.found, self.version)
            self.epoch.epoch = self.epoch.found
        elif self.epoch.looked:
            lost = retry.best_effort("failover check", self.producer.reconcile)
            if lost:
                log.error("worker %s: the server lacks %d positions it had acknowledged (a failover): counted as "
                          "lost in the worker's record", self.worker_id, lost)

    def heartbeat(self, state: str, force: bool = False) -> None:
        """Write the heartbeat hash, at most every ``stream.heartbeat_s`` unless ``force``."""
        if not force and time.monotonic() - self.last_beat < self.cfg.stream.heartbeat_s:
            return
        self.last_beat = time.monotonic()
        st = self.stats
        st.update_rate(self.producer.waited_s)
        fields = {"host": self.host, "pid": os.getpid(), "state": state, "version": self.version,
                  "device": str(self.selfplay.device), "positions": st.positions_sent, "games": st.games_sent,
                  "batches": st.batches_sent, "positions_played": st.positions_played,
                  "positions_per_s": round(st.positions_per_s, 1), "backpressure_s": round(self.producer.waited_s, 2),
                  "backpressure_share": round(st.backpressure_share, 3),
                  "oom_waits": self.producer.oom_waits, "discarded_positions": st.discarded_positions,
                  "credit": self.producer.last_credit, "adds_refused": self.producer.refused,
                  "lost_positions": self.producer.lost_positions,
                  "games_not_recorded": st.games_not_recorded, "server_restarts": st.server_restarts, "games_at_once": self.selfplay.num_games,
                  "last_seen": round(time.time(), 3), **retry.OUTAGES.fields()}
        retry.best_effort("heartbeat", write_worker_heartbeat, self.r, self.keys, self.worker_id, fields,
                          self.cfg.stream.heartbeat_ttl_s)

    def shutdown(self) -> None:
        """Cut every game's unsent positions into segments and send them (waiting up to
        :data:`FINAL_SEND_S` for room), then count what could not be sent in the worker's producer
        record (``discarded``) and the last heartbeat."""
        self.queue(self.selfplay.flush())
        deadline = time.monotonic() + FINAL_SEND_S
        self.send(lambda: time.monotonic() > deadline, everything=True)
        discarded = self.outbox_positions
        self.stats.discarded_positions += discarded
        if discarded:
            retry.best_effort("discard count", self.producer.record_discarded, discarded)
        self.heartbeat("stopped", force=True)
        log.info("worker %s: stopped (%d positions sent, %d discarded at stop)", self.worker_id,
                 self.stats.positions_sent, discarded)


def run_worker(
    redis_url: str,
    run_id: str,
    *,
    games: int | None = None,
    threads: int | None = None,
    worker_id: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    max_batches: int | None = None,
    read_url: str | None = None,
) -> WorkerStats:
    """Run one self-play worker until control says ``stop``, a signal arrives or ``max_batches``.

    Args:
        redis_url: ``redis://host:port/db``, ``rediss://...`` or ``unix:///path/redis.sock``
            (user and password in the URL: workers run as the run's ``worker`` ACL user).
        run_id: the run's id (the ``{run}`` of the keys).
        games: games played at once (default: the run config's ``worker.games``).
        threads: torch intra-op threads (default: ``worker.threads``).
        worker_id: id in heartbeats and stream entries (default ``{host}-{pid}``).
        seed: RNG seed of the games and sampling (default: run seed + pid).
        device: where the forward pass runs (default: ``worker.device``; ``auto``, ``cpu``,
            ``cuda``, ``cuda:N``).
        max_batches: stop after sending this many batches (tests, benchmarks).
        read_url: where to read the config, ``control`` and the weights and hear their
            announcements: the host's read-only copy of the run (``keisei relay``'s socket, or a
            replica of the primary), so that a host fetches each version once; None: ``redis_url``.
            Everything the worker writes goes to ``redis_url``.

    Returns:
        The final :class:`WorkerStats`.
    """
    stop = retry.StopFlag()
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    keys = Keys(run_id)
    r = connect(redis_url)
    read = connect(read_url) if read_url else r
    log.info("worker %s: waiting for the run config at %s", worker_id, keys.config)
    try:  # a worker user may not (it was put on the roster with its user); an admin URL may
        register_workers(r, keys, [worker_id])
    except NoPermissionError:
        pass
    cfg = wait_for_config(read, keys, stop)
    if cfg is None:
        return WorkerStats()
    w = Worker.start(cfg, r, keys, worker_id, games=games, threads=threads, seed=seed, device=device, read=read)
    if not w.wait_for_weights(stop):
        return w.stats

    def stopping() -> bool:  # asked before each wait of a send: a stop ends it
        return stop.requested or w.read_control() == "stop"

    try:
        while not stopping():
            if w.control == "pause":
                w.heartbeat("paused")
                time.sleep(0.1)  # short sleeps: a pause never blocks a stop
                continue
            w.load_new_weights()
            w.play_step()
            if w.outbox_positions >= cfg.stream.batch_positions:
                w.send(stopping)
                if max_batches is not None and w.stats.batches_sent >= max_batches:
                    break
            w.check_server()
            w.heartbeat("playing")
        w.shutdown()
    except retry.TRANSIENT_ERRORS as exc:  # only when stopped during an outage
        held = w.outbox_positions + w.selfplay.unsent_positions
        log.error("worker %s: stopped while Redis is unreachable (%s); %d positions not sent or counted",
                  worker_id, exc, held)
    return w.stats
