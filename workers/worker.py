"""The self-play worker: plays N games at once with the current policy and streams finished games.

Read top to bottom: connect, read the run's config from Redis, wait for weights version 1, then
loop { obey control, pick up new weights, one batched forward pass, step N games, send finished
games through the producer (which waits while the learner's backlog is full), heartbeat }.

Nothing here is lost silently: a batch is one XADD (atomic), games unfinished at shutdown and
finished games that could not be sent before the stop are counted in the run's accounting hash
(``worker_discarded_positions``) and in the worker's last heartbeat.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from keisei_stream.wire import schema
from keisei_stream.wire.codec import ExperienceBatch
from keisei_stream.config import Config, config_from_json
from keisei_stream.wire.embedded_redis import connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import append_game, get_control, write_worker_heartbeat
from keisei_stream.wire.weights import WeightsError, WeightsWatcher, read_latest_weights
from keisei_stream.rl.model import build_model
from keisei_stream.rl.checkpoint import load_weights_bytes
from keisei_stream.rl.policy import act
from keisei_stream.play.records import game_fields
from keisei_stream.shogi import VecEnv

log = logging.getLogger("keisei.worker")


@dataclass
class WorkerStats:
    """Counters reported in the heartbeat (all since the worker started)."""

    positions_sent: int = 0
    games_sent: int = 0
    batches_sent: int = 0
    positions_played: int = 0
    discarded_positions: int = 0
    backpressure_s: float = 0.0
    rate_t0: float = field(default_factory=time.monotonic)
    rate_n0: int = 0
    positions_per_s: float = 0.0

    def update_rate(self) -> None:
        """Positions/s of self-play over the interval since the last call."""
        now = time.monotonic()
        dt = now - self.rate_t0
        if dt >= 1.0:
            self.positions_per_s = (self.positions_played - self.rate_n0) / dt
            self.rate_t0, self.rate_n0 = now, self.positions_played


@dataclass
class Trajectories:
    """Per-game trajectory buffers of the games in play.

    Attributes:
        length: ``(N,) int64`` positions stored per game.
        columns: one array per column of ``schema.POSITION`` (``hcp``, ``ply``, ``repetition``,
            ``action``, ``log_prob``, ``value``, ``version``), native-endian, shaped
            ``(N, max_plies, *row shape)``: position ``t`` of game ``i`` is at ``[i, t]``.
    """

    length: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def empty(cls, n: int, max_plies: int) -> "Trajectories":
        return cls(np.zeros(n, np.int64), schema.zeros(schema.POSITION, (n, max_plies)))

    def take(self, i: int) -> dict[str, np.ndarray]:
        """Copy out game ``i``'s positions (one ``(length, *row shape)`` array per column) and clear it."""
        k = int(self.length[i])
        self.length[i] = 0
        return {name: col[i, :k].copy() for name, col in self.columns.items()}


def selfplay_step(env: VecEnv, model: torch.nn.Module, traj: Trajectories, version: int,
                  temperature: float, rng: torch.Generator | None = None):
    """One step of N games: one batched forward pass, N moves sampled, N positions recorded.

    Returns:
        ``(StepResult, finished)`` where ``finished`` lists ``(GameRecord, chunk)`` for the games that
        ended in this step, ``chunk`` being :meth:`Trajectories.take`'s arrays of that game.
    """
    obs, mask = env.observe(copy=False)  # act() copies them into tensors before env.step
    hcp, ply, repetition, _turn = env.positions()
    actions, log_prob, value = act(model, obs, mask, temperature, generator=rng)
    recorded = {"hcp": hcp, "ply": ply, "repetition": repetition, "action": actions, "log_prob": log_prob,
                "value": value, "version": version}
    rows, t = np.arange(env.num_games), traj.length
    for name, col in traj.columns.items():
        col[rows, t] = recorded[name]
    traj.length += 1
    res = env.step(actions)
    done_idx = np.flatnonzero(res.done)
    finished = [(record, traj.take(int(i))) for i, record in zip(done_idx, res.finished)]
    return res, finished


class _Stop:
    """Set by SIGTERM/SIGINT; checked between steps so no entry is ever half-written."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:  # signal handler
        self.requested = True


def wait_for_config(r, keys: Keys, stop: _Stop, poll_s: float = 0.5) -> Config | None:
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


def run_worker(
    redis_url: str,
    run_id: str,
    *,
    games: int | None = None,
    threads: int | None = None,
    worker_id: str | None = None,
    seed: int | None = None,
    max_batches: int | None = None,
) -> WorkerStats:
    """Run one self-play worker until control says ``stop``, a signal arrives or ``max_batches``.

    Args:
        redis_url: ``redis://host:port/db`` or ``unix:///path/redis.sock`` (password in the URL).
        run_id: the run's id (the ``{run}`` of the keys).
        games: games played at once (default: the run config's ``worker.games``).
        threads: torch intra-op threads (default: ``worker.threads``).
        worker_id: id in heartbeats and stream entries (default ``{host}-{pid}``).
        seed: RNG seed of the games and sampling (default: run seed + pid).
        max_batches: stop after sending this many batches (tests, benchmarks).

    Returns:
        The final :class:`WorkerStats`.
    """
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host = socket.gethostname()
    worker_id = worker_id or f"{host}-{os.getpid()}"
    keys = Keys(run_id)
    r = connect(redis_url)
    stats = WorkerStats()
    last_beat = 0.0  # monotonic time of the last heartbeat

    def heartbeat(state: str, version: int, force: bool = False) -> None:
        """Write the heartbeat hash, at most every ``stream.heartbeat_s`` unless ``force``."""
        nonlocal last_beat
        if not force and time.monotonic() - last_beat < cfg.stream.heartbeat_s:
            return
        last_beat = time.monotonic()
        stats.update_rate()
        write_worker_heartbeat(
            r, keys, worker_id,
            {
                "host": host, "pid": os.getpid(), "state": state, "version": version,
                "positions": stats.positions_sent, "games": stats.games_sent,
                "batches": stats.batches_sent, "positions_played": stats.positions_played,
                "positions_per_s": round(stats.positions_per_s, 1),
                "backpressure_s": round(stats.backpressure_s, 2),
                "discarded_positions": stats.discarded_positions,
                "games_at_once": n, "last_seen": round(time.time(), 3),
            },
            cfg.stream.heartbeat_ttl_s,
        )

    # --- the run's config (written by the learner) --------------------------------------------
    log.info("worker %s: waiting for the run config at %s", worker_id, keys.config)
    cfg = wait_for_config(r, keys, stop)
    if cfg is None:
        return stats
    n = games or cfg.worker.games
    torch.set_num_threads(threads or cfg.worker.threads)
    seed = cfg.run.seed + os.getpid() if seed is None else seed
    rng = torch.Generator().manual_seed(seed)
    model = build_model(cfg.model)
    model.eval()
    watcher = WeightsWatcher(r, keys, cfg.stream.weights_poll_s)
    producer = Producer(r, keys, worker_id, cfg.stream.max_backlog, cfg.stream.backoff_max_s)

    # --- never play with random weights: wait for version >= 1 ---------------------------------
    version = 0

    def maybe_load_weights() -> None:
        nonlocal version
        announced = watcher.poll()
        if announced is None or announced <= version:
            return
        try:
            latest = read_latest_weights(r, keys)
        except WeightsError as exc:  # wrong sha256: refuse, keep the current weights
            log.error("worker %s: refused weights: %s", worker_id, exc)
            return
        if latest is None or latest[0] <= version:
            return
        load_weights_bytes(model, latest[2])
        version = latest[0]
        log.info("worker %s: loaded weights version %d", worker_id, version)

    while version < 1:
        if stop.requested or get_control(r, keys) == "stop":
            return stats
        maybe_load_weights()
        if version < 1:
            heartbeat("waiting_weights", version)
            time.sleep(0.1)

    # --- self-play --------------------------------------------------------------------------
    max_plies = cfg.env.max_plies
    env = VecEnv(n, max_plies, seed=seed)
    traj = Trajectories.empty(n, max_plies)
    outbox: list[tuple[int, int, dict[str, np.ndarray]]] = []  # finished, unsent: (result, reason, chunk)
    outbox_positions = 0
    control, control_checked = "run", 0.0

    def read_control() -> str:
        nonlocal control, control_checked
        now = time.monotonic()
        if now - control_checked > 0.25:
            control, control_checked = get_control(r, keys), now
        return control

    def send_outbox(wait: bool) -> bool:
        """Send the finished games as one batch; False when stopped while waiting."""
        nonlocal outbox, outbox_positions
        if not outbox:
            return True
        chunks = [c for _, _, c in outbox]
        offsets = np.zeros(len(outbox) + 1, dtype=np.uint32)
        offsets[1:] = np.cumsum([len(c["ply"]) for c in chunks])
        batch = ExperienceBatch(
            batch_id=producer.next_batch_id(), worker_id=worker_id,
            **{name: np.concatenate([c[name] for c in chunks]) for name in schema.POSITION.names},
            game_offsets=offsets,
            result=np.array([g[0] for g in outbox], dtype=np.int8),
            reason=np.array([g[1] for g in outbox], dtype=np.uint8),
        )

        def should_stop() -> bool:
            # While backpressure holds us, keep obeying control, signals and the heartbeat.
            heartbeat("backpressure", version)
            maybe_load_weights()
            return (not wait) or stop.requested or read_control() == "stop"

        waited0 = producer.waited_s
        sent = producer.send(batch, should_stop=should_stop)
        stats.backpressure_s += producer.waited_s - waited0
        if sent:
            stats.batches_sent += 1
            stats.positions_sent += batch.num_positions
            stats.games_sent += batch.num_games
            outbox, outbox_positions = [], 0
        return sent

    while True:
        if stop.requested or read_control() == "stop":
            break
        if control == "pause":
            heartbeat("paused", version)
            time.sleep(0.1)  # short sleeps: a pause never blocks a stop
            continue
        maybe_load_weights()

        res, finished = selfplay_step(env, model, traj, version, cfg.worker.temperature, rng)
        stats.positions_played += n
        for record, chunk in finished:
            outbox.append((int(record.result), int(record.reason), chunk))
            outbox_positions += len(chunk["ply"])
            if cfg.worker.record_games:
                fields = game_fields(record)
                fields.update({"worker": worker_id, "version": version})
                append_game(r, keys, fields, cfg.stream.games_maxlen)

        if outbox_positions >= cfg.stream.batch_positions:
            send_outbox(wait=True)
            if max_batches is not None and stats.batches_sent >= max_batches:
                break
        heartbeat("playing", version)

    # --- clean shutdown: one last non-waiting send, then count what is left ------------------
    if outbox:
        send_outbox(wait=False)
    discarded = outbox_positions + int(traj.length.sum())
    stats.discarded_positions += discarded
    if discarded:
        r.hincrby(keys.accounting, "worker_discarded_positions", discarded)
    heartbeat("stopped", version, force=True)
    log.info("worker %s: stopped (%d positions sent, %d discarded at stop)", worker_id,
             stats.positions_sent, discarded)
    return stats
