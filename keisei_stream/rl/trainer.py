"""The trainer: one learner update from a batch of experience, read top to bottom.

:meth:`Trainer.update` takes the positions of the entries an update holds
(:class:`~keisei_stream.experience.ExperienceBatch`, joined by ``concat_batches``) and runs, in
this order:

1. **staleness** (:func:`~keisei_stream.rl.gae.filter_stale`): positions played by a model older
   than ``ppo.max_policy_lag`` versions are not trained (they are counted as stale);
2. **inputs**: observations ``(P, 46, 9, 9)`` and legal masks ``(P, 13527)`` rebuilt from the
   32-byte positions (on a GPU: the compact form, usually encoded ahead by
   :meth:`Trainer.encode_ahead` while the previous update trained, crosses to the device from
   pinned memory and is expanded there, :mod:`keisei_stream.rl.inputs`);
3. **proximal pass** (``ppo.recompute_values``): the values and log-probabilities of the model at
   the start of the update, through the same module (compiled or not) the update's ratio uses;
4. **advantages** (:func:`~keisei_stream.rl.gae.segment_advantages`): GAE with the zero-sum sign
   flip over the batch's segments, joined where one game's consecutive segments are all held,
   bootstrapped at a cut whose continuation is not (on a GPU the host joins the segments while
   the device runs the proximal pass, and the scan runs on the device:
   :func:`~keisei_stream.rl.gae.scan_advantages`);
5. **the PPO update** (:func:`~keisei_stream.rl.ppo.ppo_update`);
6. **metrics** of the update: the PPO metrics, policy lag, game statistics, input bytes.

On a GPU nothing in steps 2-5 waits for the device except the one read of the metrics at the end
(:func:`~keisei_stream.rl.device.read_host`; the CUDA tests run an update under
``torch.cuda.set_sync_debug_mode("error")``). With ``model.compile`` the update runs eagerly until
:class:`~keisei_stream.rl.compile.CompileAhead` has the compiled model ready, and compiled from
the next update on.

With several learner ranks every rank calls :meth:`Trainer.update` on its own share; the few
collectives needed (any fresh position on any rank, the lag over all ranks) are in
:mod:`keisei_stream.rl.distributed`. Never imports redis.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from keisei_stream.config import Config
from keisei_stream.rl import distributed
from keisei_stream.rl.checkpoint import checkpoint_name, load_checkpoint, prune_checkpoints, save_checkpoint
from keisei_stream.rl.compile import SMALL_BATCH, CompileAhead, warm_up_calls
from keisei_stream.rl.device import to_device, use_device
from keisei_stream.rl.gae import filter_stale, scan_advantages, segment_advantages, segment_plan
from keisei_stream.rl.inputs import CompactAhead, compact_nbytes, expand_on_device
from keisei_stream.rl.model import build_model, maybe_compile
from keisei_stream.rl.ppo import apply_config, make_optimizer, make_scheduler, ppo_update, proximal_pass
from keisei_stream.shogi import EndReason, encode_positions
from keisei_stream.experience import ExperienceBatch


@dataclass
class Update:
    """What one update did.

    Attributes:
        metrics: every metric of the update (PPO's, ``policy_lag_mean``/``max``,
            ``input_bytes_per_position``, game statistics, ``trained_positions``,
            ``stale_positions``; with several ranks the lag and counts over all ranks).
        keep: ``(P,) bool``, the positions trained (the others were stale).
        stepped: the weights changed (at least one optimiser step): a new version to publish.
    """

    metrics: dict[str, float]
    keep: np.ndarray
    stepped: bool


def game_stats(b: ExperienceBatch) -> dict[str, float]:
    """Win/draw rates and length of the games that ended in ``b``'s segments (from their end
    reasons; ``games`` counts them, ``segments`` every segment)."""
    ended = b.ended
    reasons = b.reason[ended].astype(np.int64)
    results = b.result[ended].astype(np.int64)
    lengths = b.ply[b.segment_offsets[1:][ended].astype(np.int64) - 1].astype(np.int64) + 1  # plies played
    g = max(len(reasons), 1)
    return {
        "games": float(len(reasons)),
        "segments": float(b.num_segments),
        "game_plies_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "decisive_rate": float((results != 0).sum() / g),
        "draw_rate": float((results == 0).sum() / g),
        "black_win_rate": float((results > 0).sum() / g),
        "checkmate_rate": float((reasons == EndReason.CHECKMATE).sum() / g),
        "max_plies_rate": float((reasons == EndReason.MAX_PLIES).sum() / g),
        "repetition_rate": float(np.isin(reasons, [EndReason.REPETITION_DRAW, EndReason.PERPETUAL_CHECK]).sum() / g),
    }


@dataclass
class Trainer:
    """The model being trained and how: parameters, optimiser, schedule and device.

    Attributes:
        cfg: the run config. device: where the model trains.
        model: the parameters (what is checkpointed and published).
        train_model: what runs the forward passes: ``model`` itself, or wrapped in
            ``DistributedDataParallel`` (several ranks) and/or ``torch.compile`` (``model.compile``);
            it shares ``model``'s parameters.
        optimizer, scheduler: from :func:`~keisei_stream.rl.ppo.make_optimizer` and
            :func:`~keisei_stream.rl.ppo.make_scheduler`.
        compact: inputs cross to the device in compact form and GAE runs there (default: on
            CUDA; tests set it on the CPU to check this path against the dense one).
        compiling: the background compile (:meth:`wrap` with ``compile_ahead``), None without one.
        ahead: compact inputs encoded ahead of their update (with ``compact``).
    """

    cfg: Config
    device: torch.device
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    compact: bool = False
    compiling: CompileAhead | None = None
    ahead: CompactAhead | None = None

    @classmethod
    def build(cls, cfg: Config, device: torch.device) -> "Trainer":
        """A freshly initialised model on ``device`` with its optimiser and schedule (seeded by
        ``cfg.run.seed``); :meth:`wrap` it once its state is final."""
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        model = build_model(cfg.model).to(device)
        optimizer = make_optimizer(model, cfg.ppo)
        compact = device.type == "cuda"
        return cls(cfg, device, model, model, optimizer, make_scheduler(optimizer, cfg.ppo), compact=compact,
                   ahead=CompactAhead(cfg.env.max_plies) if compact else None)

    def restore(self, source: str | Path | io.BytesIO) -> dict[str, Any]:
        """Load a checkpoint (file or bytes) into the model, optimiser and schedule; the learning
        rate follows the config, not the checkpoint (:func:`~keisei_stream.rl.ppo.apply_config`).

        Returns:
            The checkpoint's ``{"version", "updates", "config_json", "extra"}``.

        Raises:
            CheckpointError: unreadable, or it does not fit the model.
        """
        info = load_checkpoint(source, self.model, self.optimizer, self.scheduler, map_location=self.device)
        apply_config(self.optimizer, self.scheduler, self.cfg.ppo)
        return info

    def save(self, target: str | Path | io.BytesIO, version: int, updates: int, extra: dict | None = None) -> None:
        """The whole training state to a checkpoint file (atomic) or an open binary file."""
        save_checkpoint(target, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        version=version, updates=updates, config_json=self.cfg.to_json(), extra=extra)

    def start_state(self, checkpoint: str | Path | None, newest_published: int | None) -> tuple[int, int]:
        """``(version, updates)`` to start from. Rank 0 restores ``checkpoint`` (when given) and
        takes a version above ``newest_published`` (workers load only newer versions); with several
        ranks every other rank receives rank 0's whole training state (model, optimiser moments,
        schedule, version) over the process group."""
        version, updates = 1, 0
        if distributed.rank() == 0:
            if checkpoint is not None:
                info = self.restore(checkpoint)
                version, updates = int(info["version"]), int(info["updates"])
            if newest_published is not None and newest_published >= version:
                version = newest_published + 1
        if distributed.world_size() > 1:
            buf = io.BytesIO()
            if distributed.rank() == 0:
                self.save(buf, version, updates)
            state = distributed.broadcast_bytes(buf.getvalue() if distributed.rank() == 0 else None)
            if distributed.rank() != 0:
                info = self.restore(io.BytesIO(state))
                version, updates = int(info["version"]), int(info["updates"])
        return version, updates

    def checkpoint(self, directory: Path, version: int, updates: int, keep: int, extra: dict | None = None) -> Path:
        """``directory/ckpt_{version}.pt`` (atomic), keeping the newest ``keep`` checkpoints."""
        path = directory / checkpoint_name(version)
        self.save(path, version, updates, extra)
        prune_checkpoints(directory, keep)
        return path

    def wrap(self, compile_ahead: bool = False, compile_fn=torch.compile) -> None:
        """``train_model``: DDP over the learner ranks when there are several; with
        ``model.compile``, ``torch.compile`` of it: made in the background (``compile_ahead``,
        one rank: the updates run eagerly until it is ready, :class:`CompileAhead`), or at once
        (several ranks compile in step before the first update: :meth:`warm_up`)."""
        model: nn.Module = self.model
        if distributed.world_size() > 1:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                            broadcast_buffers=False)
        if compile_ahead and self.cfg.model.compile:
            self.train_model = model
            self.compiling = CompileAhead(model, self.device, self.cfg.learner.amp, self.cfg.ppo.minibatch_size,
                                          compile_fn=compile_fn)
        else:
            self.train_model = maybe_compile(model, self.cfg.model)

    def warm_up(self) -> float:
        """Compile ``train_model``'s graphs now (forward with and without gradients, the minibatch
        size and a small one, batch dimension dynamic), leaving parameters, gradients and
        optimiser untouched: what several learner ranks do together before their first update.

        Returns:
            Seconds taken.
        """
        t0 = time.monotonic()
        if self.cfg.model.compile:
            warm_up_calls(self.train_model, (max(2, self.cfg.ppo.minibatch_size), SMALL_BATCH), self.device,
                          self.cfg.learner.amp)
            self.optimizer.zero_grad(set_to_none=True)
        return time.monotonic() - t0

    def encode_ahead(self, batches: list[ExperienceBatch]) -> float:
        """Encode the compact inputs of ``batches`` (the entries held for the next updates) while
        an update trains, forgetting those of batches no longer held; seconds taken (0 on the
        dense path)."""
        return self.ahead.encode(batches) if self.ahead is not None else 0.0

    def take_ahead(self, batches: list[ExperienceBatch]) -> dict[str, np.ndarray] | None:
        """The compact inputs of the update made of ``batches`` (concatenated in order; those not
        encoded ahead are encoded now), or None on the dense path."""
        return self.ahead.take(batches) if self.ahead is not None else None

    # ------------------------------------------------------------------------------ the update
    def update(self, b: ExperienceBatch, version: int, compact: dict[str, np.ndarray] | None = None) -> Update:
        """One update on the positions of ``b`` by a learner at ``version`` (module docstring);
        ``compact``: ``b``'s compact inputs when encoded ahead (:meth:`take_ahead`).

        Every rank calls it (a rank holding nothing with an empty batch); nothing is trained when
        no rank holds a fresh position. Runs in the learner's training thread (whose current CUDA
        device it sets).
        """
        cfg = self.cfg
        use_device(self.device)
        if self.compiling is not None and self.train_model is not self.compiling.current():
            self.train_model = self.compiling.current()  # between updates: one module per update
        versions = b.version.astype(np.int64)
        keep = filter_stale(versions, version, cfg.ppo.max_policy_lag)
        n_keep = int(keep.sum())
        metrics: dict[str, float] = {}
        if distributed.all_reduce([n_keep])[0]:
            metrics = self.train_compact(b, keep, compact) if self.compact else self.train(b, keep)
            metrics["compiled"] = float(hasattr(self.train_model, "_orig_mod"))  # a torch.compile wrapper
            lag = version - versions[keep]
            lag_sum, n_all = distributed.all_reduce([float(lag.sum()), float(n_keep)])
            (lag_max,) = distributed.all_reduce([float(lag.max()) if n_keep else -1e9], op="max")
            metrics.update({"policy_lag_mean": lag_sum / n_all, "policy_lag_max": lag_max})
        trained, stale = (int(x) for x in distributed.all_reduce([n_keep, len(keep) - n_keep]))
        metrics.update(game_stats(b))
        metrics.update({"trained_positions": float(trained), "stale_positions": float(stale)})
        return Update(metrics, keep, stepped=metrics.get("minibatches", 0.0) > 0)

    def train(self, b: ExperienceBatch, keep: np.ndarray) -> dict[str, float]:
        """Inputs, the proximal pass, GAE and the PPO update on the ``keep`` positions of ``b``;
        returns the update's metrics (with ``rebuild_s``, ``train_s`` and
        ``input_bytes_per_position``).

        With ``ppo.recompute_values`` the advantages and returns come from the values of the
        model as it is at the start of the update (one no-grad pass over every position of the
        games, which also gives the proximal log-probabilities PPO needs), not from the values the
        workers recorded up to ``max_policy_lag`` versions ago: IMPALA's V-trace targets are built
        from the learner's values too (Espeholt et al. 2018, arXiv:1802.01561, sec. 4.1).
        """
        cfg, n_keep = self.cfg, int(keep.sum())
        t0 = time.monotonic()
        rows = np.ones_like(keep) if cfg.ppo.recompute_values else keep  # the pass needs every position
        obs, mask, input_bytes = self.inputs(b, rows if n_keep else keep)
        actions = torch.from_numpy(b.action[rows].astype(np.int64))
        batch = {"log_prob": torch.from_numpy(b.log_prob[keep])}
        t1 = time.monotonic()  # the proximal pass below is training time
        values = b.value.astype(np.float32)
        if cfg.ppo.recompute_values:
            if n_keep:
                prox_logp, values_t = proximal_pass(self.train_model, obs, mask, actions, self.device,
                                                    cfg.learner.amp, cfg.ppo.minibatch_size)
                values = values_t.cpu().numpy()
                rows_t = torch.from_numpy(keep).to(obs.device)
                obs, mask, actions = obs[rows_t], mask[rows_t], actions[torch.from_numpy(keep)]
                batch["prox_log_prob"] = prox_logp[rows_t.to(prox_logp.device)]
            else:  # this rank holds no fresh position: nothing to evaluate
                obs, mask, actions = obs[:0], mask[:0], actions[:0]
        advantages, returns, joins = segment_advantages(b, values, cfg.ppo.gamma, cfg.ppo.gae_lambda)
        batch.update({"obs": obs, "mask": mask, "action": actions, "value": torch.from_numpy(values[keep]),
                      "advantage": torch.from_numpy(advantages[keep]), "return": torch.from_numpy(returns[keep])})
        metrics = ppo_update(self.train_model, self.optimizer, self.scheduler, batch, cfg.ppo, self.device,
                             cfg.learner.amp)
        if cfg.ppo.recompute_values and n_keep:  # how far the workers' values were from the start-of-update ones
            metrics["value_staleness"] = float(np.abs(values[keep] - b.value[keep]).mean())
        metrics.update({"rebuild_s": t1 - t0, "train_s": time.monotonic() - t1, "segment_joins": float(joins),
                        "input_bytes_per_position": input_bytes / max(n_keep, 1)})
        return metrics

    def inputs(self, b: ExperienceBatch, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(obs (R, 46, 9, 9) float32, mask (R, 13527) bool, bytes)`` of the ``rows`` of ``b``,
        dense, on the host: the CPU's inputs (2x faster there than the compact form)."""
        obs, mask = (torch.from_numpy(a) for a in encode_positions(b.hcp[rows], b.ply[rows], b.repetition[rows],
                                                                   self.cfg.env.max_plies))
        return obs, mask, obs.numel() * 4 + mask.numel()

    def train_compact(self, b: ExperienceBatch, keep: np.ndarray,
                      compact: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """:meth:`train` on the device without the host waiting for it (a GPU's path): the compact
        inputs of every position of ``b`` (``compact``, or encoded now) and its columns cross from
        pinned memory, the inputs are expanded on the device; the proximal pass is launched, and
        while the device runs it the host joins the segments (:func:`~keisei_stream.rl.gae.segment_plan`,
        cshogi); GAE's scan runs on the device (:func:`~keisei_stream.rl.gae.scan_advantages`),
        the ``keep`` rows are gathered by index (a boolean mask would make the host wait), and
        the PPO update reads its metrics once at its end. The same update as :meth:`train`, up to
        float rounding (a test compares them on the CPU).
        """
        cfg, dev, n_keep = self.cfg, self.device, int(keep.sum())
        gamma, lam = cfg.ppo.gamma, cfg.ppo.gae_lambda
        t0 = time.monotonic()
        if compact is None:
            compact = CompactAhead(cfg.env.max_plies).take([b])
        t = to_device({**compact, "action": b.action.astype(np.int32),  # uint16 has few CUDA kernels
                       "log_prob": b.log_prob, "value": b.value,
                       "keep": np.flatnonzero(keep)}, dev,
                      {"action": torch.int64, "log_prob": torch.float32, "value": torch.float32, "keep": torch.int64})
        obs, mask = expand_on_device(t["pieces"], t["scalars"], t["actions"], t["counts"])
        actions, values = t["action"], t["value"]
        t1 = time.monotonic()  # the proximal pass below is training time
        extra: dict[str, torch.Tensor] = {}
        prox_logp, worker_values = None, values
        if cfg.ppo.recompute_values and n_keep:
            prox_logp, values = proximal_pass(self.train_model, obs, mask, actions, dev, cfg.learner.amp,
                                              cfg.ppo.minibatch_size)
        chains, plan = segment_plan(b, gamma, lam)  # host work while the device runs the pass
        p = to_device({"order": chains.order, "last": plan.last, "tail": plan.tail, "by_level": plan.by_level}, dev)
        v = values.double()[p["order"]]
        a = scan_advantages(v, p["last"], p["tail"], p["by_level"], plan.bounds, gamma, lam)
        advantages, returns = torch.empty_like(v), torch.empty_like(v)
        advantages[p["order"]], returns[p["order"]] = a, a + v

        def rows(x: torch.Tensor) -> torch.Tensor:  # the keep rows, by index (all of them: no copy)
            return x if n_keep == len(keep) else x[t["keep"]]

        batch = {"obs": rows(obs), "mask": rows(mask), "action": rows(actions), "log_prob": rows(t["log_prob"]),
                 "value": rows(values), "advantage": rows(advantages).float(), "return": rows(returns).float()}
        if prox_logp is not None:
            batch["prox_log_prob"] = rows(prox_logp)
            extra["value_staleness"] = (rows(values) - rows(worker_values)).abs().double().mean()
        metrics = ppo_update(self.train_model, self.optimizer, self.scheduler, batch, cfg.ppo, dev, cfg.learner.amp,
                             extra_metrics=extra)
        metrics.update({"rebuild_s": t1 - t0, "train_s": time.monotonic() - t1, "segment_joins": float(chains.joins),
                        "input_bytes_per_position": compact_nbytes(compact) / max(n_keep, 1)})
        return metrics
