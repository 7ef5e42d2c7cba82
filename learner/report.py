"""What the learner reports: the time it spends in each phase, each update's metrics to every sink
(the ``metrics`` stream, TensorBoard, W&B, the console/log line) and the ``learner`` status hash.

The status (the run's accounting read, then the ``learner`` hash written) goes out from a thread of
its own: its reads grow with the number of workers (one pipelined round trip over their producer
records, :func:`keisei_stream.wire.status.read_accounting`) and must never hold up the thread
that reads and acknowledges experience."""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from keisei_stream.config import Config
from keisei_stream.wire import retry
from keisei_stream.wire.atomic import UNREPLICATED
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import (
    METRICS_FILE, append_metrics, metrics_line, read_accounting, write_learner_status,
)

#: Seconds between the learner's reads of the run's accounting (one command per worker: its
#: producer record). What it read is only what a loss of the server's data is measured against
#: (the ``losses`` entries: a lower bound; each worker counts the adds a failover lost exactly).
ACCOUNTING_S = 30.0

log = logging.getLogger("keisei.learner")

#: Time shares reported per update (seconds since the previous update, by activity). Decoding
#: the next entries overlaps training (the learner's prefetch), so the shares can sum above 1.
PHASES = ("wait", "decode", "rebuild", "train", "ack", "publish")


class MetricsSinks:
    """Every sink of the metrics of an update: the ``metrics`` stream and its copy in the run
    directory (:data:`~keisei_stream.wire.status.METRICS_FILE`, appended across ``--resume``),
    TensorBoard, W&B and the console.

    Args:
        cfg: the run config (``learner.tensorboard``, ``learner.wandb``...). r, keys: the run's Redis.
        run_dir: ``runs/{run}`` (TensorBoard writes to ``tensorboard/`` in it). quiet: no console line.
        primary: rank 0 of several learners (or the only one); the other ranks only log the line.
    """

    def __init__(self, cfg: Config, r: redis.Redis, keys: Keys, run_dir: Path, quiet: bool, primary: bool = True):
        self.cfg, self.r, self.keys, self.primary = cfg, r, keys, primary
        self.console = None if quiet or not primary else Console()
        self.tb = self.wandb = None
        self.file = open(run_dir / METRICS_FILE, "a", buffering=1) if primary else None  # line-buffered
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

    def emit(self, step: int, version: int, metrics: dict[str, float]) -> None:
        """Send ``metrics`` of update ``step`` (publishing ``version``) everywhere, and its
        :func:`console_line` to the console and the log."""
        line = console_line(version, step, metrics)
        log.info(line)
        if not self.primary:
            return
        fields = {"version": version, "updates": step, **metrics}
        self.file.write(metrics_line(fields, time.time()))
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
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def console_line(version: int, updates: int, m: dict[str, float]) -> str:
    """The one-line summary of an update."""
    return (f"v{version} upd {updates} | {m['samples_per_s']:.0f} samples/s | backlog {m['backlog']:.0f} | "
            f"lag {m['policy_lag_mean']:.2f} w {m['is_weight_mean']:.2f} cut {m['is_weight_truncated']:.2f} | "
            f"pi {m['policy_loss']:.4f} v {m['value_loss']:.4f} H {m['entropy']:.3f} kl {m['approx_kl']:.4f} | "
            f"games {m['games']:.0f} win B/W {m['black_win_rate']:.2f}/{m['decisive_rate'] - m['black_win_rate']:.2f} "
            f"draw {m['draw_rate']:.2f} plies {m['game_plies_mean']:.0f} | stale {m['stale_positions']:.0f}")


@dataclass
class Report:
    """The learner's reporting between updates.

    Attributes:
        seconds: time spent per phase of :data:`PHASES` since the last update.
        last_metrics: the last update's metrics (also in the status hash).
        last_accounting: the run's accounting as the last status write read it (what a loss of
            the server's data is measured against).
        writer: the thread the status goes out from (:meth:`status`).
    """

    cfg: Config
    r: redis.Redis
    keys: Keys
    sinks: MetricsSinks
    primary: bool  # rank 0 (or the only learner) writes the status hash
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    last_update_t: float = field(default_factory=time.monotonic)
    last_status_t: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_accounting: dict[str, int] = field(default_factory=dict)
    writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="status"))
    _writing: Future | None = None
    _accounting_t: float = -math.inf  # monotonic time of the last accounting read

    def add(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` (>= 0) spent in ``phase``."""
        self.seconds[phase] += seconds

    def update(self, metrics: dict[str, float], step: int, version: int, stepped: bool, backlog: int) -> dict[str, float]:
        """Complete an update's metrics with its throughput (``samples_per_s``: trained positions
        over the seconds since the previous update), the ``backlog`` (entries in the workers'
        streams), the outages and the time shares, and send them to every sink when the update
        ``stepped``. Returns them."""
        now = time.monotonic()
        elapsed = max(now - self.last_update_t, 1e-9)
        metrics.update({"samples_per_s": metrics["trained_positions"] / elapsed,
                        "backlog": float(backlog), **retry.OUTAGES.fields()})
        metrics.update({f"time_share_{k}": v / elapsed for k, v in self.seconds.items()})
        self.seconds, self.last_update_t, self.last_metrics = dict.fromkeys(PHASES, 0.0), now, metrics
        if stepped:
            self.sinks.emit(step, version, metrics)
        return metrics

    def status_due(self) -> bool:
        """A status write is due (every ``stream.heartbeat_s``)."""
        return time.monotonic() - self.last_status_t >= self.cfg.stream.heartbeat_s

    def status(self, fields: dict[str, Any], wait: bool = False) -> None:
        """Write the ``learner`` hash (primary only): ``fields``, the outages, the writes no
        replica confirmed in time (``unreplicated_writes``) and the last metrics, after reading
        the accounting into :attr:`last_accounting` (at most every :data:`ACCOUNTING_S`); in the
        :attr:`writer` thread, so this returns at once. While the previous status is still being
        written this one is skipped (the next is due ``stream.heartbeat_s`` later); with ``wait``
        (the final status) it waits for that one and writes this one, its accounting read
        included, before returning."""
        self.last_status_t = time.monotonic()
        if not self.primary:
            return
        fields = {**fields, "last_seen": round(time.time(), 3), "unreplicated_writes": UNREPLICATED.count,
                  **retry.OUTAGES.fields()}
        fields.update({k: round(v, 6) for k, v in self.last_metrics.items() if k not in fields})
        busy = self._writing is not None and not self._writing.done()
        if busy and not wait:
            return
        if self._writing is not None:
            self._writing.result()  # the previous write's error, if any, surfaces here
        self._writing = self.writer.submit(self._write_status, fields, wait)
        if wait:
            self._writing.result()

    def _write_status(self, fields: dict[str, Any], force: bool = False) -> None:
        """The accounting read (every :data:`ACCOUNTING_S` at most, or ``force``: it reads every
        worker's record), then the hash. A read that spanned an outage is not kept: it may come
        from the server after a failover, and :attr:`last_accounting` must stay what the learner
        saw before it (what a failover's losses are measured against)."""
        if force or time.monotonic() - self._accounting_t >= ACCOUNTING_S:
            self._accounting_t, outages = time.monotonic(), retry.OUTAGES.outages
            accounting = read_accounting(self.r, self.keys)
            if retry.OUTAGES.outages == outages:
                self.last_accounting = accounting
        retry.best_effort("learner status", write_learner_status, self.r, self.keys, fields)

    def close(self) -> None:
        """Wait for the status being written, end the :attr:`writer` thread, close the sinks."""
        try:
            if self._writing is not None:
                self._writing.result()
        except Exception as exc:  # noqa: BLE001 - e.g. stopped during an outage: nothing more to write
            log.warning("the last status write failed: %s", exc)
        finally:
            self.writer.shutdown()
            self.sinks.close()
