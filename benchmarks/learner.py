"""PPO training throughput of the learner (forward + backward + AdamW step) per shipped config.

On the available device (CUDA when present, with bf16 autocast, else the CPU with torch's default
thread count or ``--threads``), for each config (tiny, quickstart, gpu) it builds a synthetic batch
(random observations, 30 legal actions per position, legal behaviour actions, random advantages
and returns) and measures:

* ``ppo_samples_per_s``: samples per second through :func:`keisei_stream.rl.ppo.ppo_update` with one
  epoch (so one optimiser pass over each sample, plus the update's no-grad start-of-update pass);
* ``baseline_forward_samples_per_s``: forward-only (no grad) over the same minibatches, same run;
* ``train_step_samples_per_s``: forward + backward + step alone (the update minus its no-grad pass),
  estimated as ``1 / (1/ppo - 1/forward)``;
* ``update_positions_per_s`` (part ``update``): the learner's whole update at the **run's**
  settings: :meth:`keisei_stream.rl.trainer.Trainer.update` on real self-play segments (random
  moves, cut as workers cut them), so the rebuild of the inputs from the 32-byte positions, GAE,
  the proximal pass and ``ppo.epochs`` epochs (``target_kl`` off: every epoch runs) are all in it,
  with the update's own metrics read at its end (on CUDA the device has finished then). This is
  the **limit** a whole run's trained rate is compared with (``benchmarks/gpu.py``).

The batch and minibatch sizes come from the config (``samples_per_update``, ``minibatch_size``)
capped by ``--max-samples`` (CPU default 1024; the gpu config on the CPU uses 256) so a CPU run
stays short. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from keisei_stream.config import load_config
from keisei_stream.rl.model import NUM_ACTIONS, build_model, count_parameters, maybe_compile, pick_device
from keisei_stream.rl.ppo import make_optimizer, make_scheduler, ppo_update

ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    mask = np.zeros((n, NUM_ACTIONS), dtype=bool)
    legal = rng.choice(NUM_ACTIONS, (n, 30))
    mask[np.arange(n)[:, None], legal] = True
    return {
        "obs": torch.from_numpy(rng.standard_normal((n, 46, 9, 9)).astype(np.float32)),
        "mask": torch.from_numpy(mask),
        "action": torch.from_numpy(legal[:, 0].astype(np.int64)),
        "log_prob": torch.full((n,), float(-np.log(30)), dtype=torch.float32),
        "value": torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32)),
        "advantage": torch.from_numpy(rng.standard_normal(n).astype(np.float32)),
        "return": torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32)),
    }


def _update_rate(cfg, n: int, device: torch.device, repeats: int) -> dict:
    """Positions/s of the learner's whole update at the run's settings (module docstring): one
    warm-up update, then ``repeats`` timed ones on the same batch, as a learner at the batch's
    version (no position stale)."""
    from keisei_stream.rl.selfplay import random_policy_batch
    from keisei_stream.rl.trainer import Trainer

    cfg = cfg.model_copy(deep=True)
    cfg.ppo.target_kl = None  # every epoch runs: the limit, not a lucky early stop
    cfg.ppo.samples_per_update = n
    cfg.model.compile = False
    t0 = time.perf_counter()
    b = random_policy_batch(n, max_plies=cfg.env.max_plies, games=64, segment_plies=cfg.worker.segment_plies,
                            lookahead_plies=cfg.worker.lookahead_plies, seed=0, version=1)
    made = time.perf_counter() - t0
    trainer = Trainer.build(cfg, device)
    trainer.update(b, 1)  # warm-up: lazy initialisations, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        upd = trainer.update(b, 1)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"update_positions": b.num_positions, "update_epochs": cfg.ppo.epochs,
            "update_recompute_values": cfg.ppo.recompute_values, "update_s": round(best, 3),
            "update_s_all": [round(t, 3) for t in times], "update_positions_per_s": round(b.num_positions / best, 1),
            "update_rebuild_s": round(float(upd.metrics.get("rebuild_s", 0.0)), 3),
            "update_minibatches": int(upd.metrics["minibatches"]), "batch_made_s": round(made, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,quickstart,gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    ap.add_argument("--max-samples", type=int, default=0, help="cap on the batch (0 = 1024 on CPU, 65536 on CUDA)")
    ap.add_argument("--repeats", type=int, default=2, help="timed updates per config")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model when its config asks for it")
    ap.add_argument("--parts", default="ppo,update", help="ppo (1 epoch vs bare forward), update (the run's settings)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp = device.type == "cuda"
    rng = np.random.default_rng(0)
    out = {
        "benchmark": "learner", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "amp_bf16": amp, "torch": torch.__version__,
        "baseline": "forward only (no grad) over the same minibatches, same run",
        "units": "samples/s", "configs": {},
    }
    t_start = time.perf_counter()
    for name in args.configs.split(","):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        cap = args.max_samples or (65536 if device.type == "cuda" else (256 if name == "gpu" else 1024))
        n = min(cfg.ppo.samples_per_update, cap)
        mb = min(cfg.ppo.minibatch_size, n)
        out["configs"][name] = {}
        if "update" in parts:
            out["configs"][name].update(_update_rate(cfg, n, device, args.repeats))
        if "ppo" not in parts:
            continue
        ppo_cfg = cfg.ppo.model_copy(update={"epochs": 1, "target_kl": None, "minibatch_size": mb})
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        opt = make_optimizer(model, ppo_cfg)
        sch = make_scheduler(opt, ppo_cfg)
        compiled = bool(args.compile and cfg.model.compile)
        train_model = maybe_compile(model, cfg.model) if compiled else model
        batch = _batch(n, rng)
        ppo_update(train_model, opt, sch, {k: v[: min(n, 2 * mb)] for k, v in batch.items()}, ppo_cfg, device, amp)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            metrics = ppo_update(train_model, opt, sch, batch, ppo_cfg, device, amp)
        _sync(device)
        ppo_rate = n * args.repeats / (time.perf_counter() - t0)

        obs = batch["obs"].to(device)

        def forward_pass() -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                for s in range(0, n, mb):
                    train_model(obs[s:s + mb])

        forward_pass()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            forward_pass()
        _sync(device)
        fwd_rate = n * args.repeats / (time.perf_counter() - t0)
        step_rate = 1.0 / max(1.0 / ppo_rate - 1.0 / fwd_rate, 1e-12)
        out["configs"][name].update({
            "parameters": count_parameters(model), "samples": n, "minibatch": mb, "compiled": compiled,
            "ppo_samples_per_s": round(ppo_rate, 1),
            "baseline_forward_samples_per_s": round(fwd_rate, 1),
            "train_step_samples_per_s": round(step_rate, 1),
            "ppo_over_forward": round(ppo_rate / fwd_rate, 3),
            "minibatches_per_update": int(metrics["minibatches"]),
        })
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
