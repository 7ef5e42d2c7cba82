"""Where each update's metrics go, behind one call: the ``metrics`` stream, TensorBoard, W&B and
the console/log line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import redis
from rich.console import Console

from keisei_stream.config import Config
from keisei_stream.wire import retry
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.status import append_metrics

log = logging.getLogger("keisei.learner")


class MetricsSinks:
    """Every sink of the metrics of an update.

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

    def emit(self, step: int, version: int, metrics: dict[str, float]) -> None:
        """Send ``metrics`` of update ``step`` (publishing ``version``) everywhere, and its
        :func:`console_line` to the console and the log."""
        line = console_line(version, step, metrics)
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


def console_line(version: int, updates: int, m: dict[str, float]) -> str:
    """The one-line summary of an update."""
    return (f"v{version} upd {updates} | {m['samples_per_s']:.0f} samples/s | backlog {m['backlog']:.0f} | "
            f"lag {m['policy_lag_mean']:.2f} w {m['is_weight_mean']:.2f} cut {m['is_weight_truncated']:.2f} | "
            f"pi {m['policy_loss']:.4f} v {m['value_loss']:.4f} H {m['entropy']:.3f} kl {m['approx_kl']:.4f} | "
            f"games {m['games']:.0f} win B/W {m['black_win_rate']:.2f}/{m['decisive_rate'] - m['black_win_rate']:.2f} "
            f"draw {m['draw_rate']:.2f} plies {m['game_plies_mean']:.0f} | stale {m['stale_positions']:.0f}")
