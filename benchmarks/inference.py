"""Inference throughput of the actor-critic (the self-play worker's forward pass), single thread.

For each shipped config (tiny, quickstart, gpu) and batch size (1, 16, 64, 256), on the CPU with
``torch.set_num_threads(1)`` (a worker uses one thread per process), under ``torch.inference_mode``
in eval mode, it measures positions/s of:

* ``forward``: the full model, policy + value (what :func:`keisei_stream.rl.policy.act` runs);
* ``baseline_trunk_value``: the same model without the policy head (stem, residual tower, value
  head) in the same run; ``policy_head_share`` = 1 - baseline_time / forward_time, the fraction
  of the forward time spent in the policy head;
* ``sample``: masked Gumbel-max sampling (:func:`keisei_stream.rl.policy.sample_actions`) on
  precomputed logits with 30 legal moves per position (a typical middlegame count), so
  ``act`` ~= forward + sample.

MACs per position are counted with forward hooks on Conv2d/Linear; ``gflops`` = 2 * MACs * rate.
Prints one JSON object. Usage: ``python benchmarks/inference.py [--min-time 0.3] [--configs tiny,...]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from keisei_stream.config import load_config
from keisei_stream.rl.model import NUM_ACTIONS, build_model, count_parameters
from keisei_stream.rl.policy import sample_actions

ROOT = Path(__file__).resolve().parent.parent


def _rate(fn, batch: int, min_time: float, min_iters: int = 2) -> float:
    """Positions per second of ``fn`` (one warm-up call, then >= min_iters calls and >= min_time s)."""
    fn()
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        elapsed = time.perf_counter() - start
        if iters >= min_iters and elapsed >= min_time:
            return batch * iters / elapsed


def _macs_per_position(model: nn.Module) -> int:
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += out.numel() * mod.in_channels * k // mod.groups
        elif isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(torch.zeros(1, 46, 9, 9))
    for h in handles:
        h.remove()
    return total[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,quickstart,gpu")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement (at least 2 calls)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    out = {
        "benchmark": "inference", "device": "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "baseline": "same model without the policy head (stem + tower + value head), same run",
        "units": "positions/s", "configs": {},
    }
    t0 = time.perf_counter()
    for name in args.configs.split(","):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml").model
        model = build_model(cfg).eval()
        macs = _macs_per_position(model)
        rows = {}
        for b in batches:
            obs = torch.from_numpy(rng.standard_normal((b, 46, 9, 9)).astype(np.float32))
            mask = np.zeros((b, NUM_ACTIONS), dtype=bool)
            mask[np.arange(b)[:, None], rng.choice(NUM_ACTIONS, (b, 30))] = True
            mask_t = torch.from_numpy(mask)
            gen = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                logits = model(obs)[0]

                def full():
                    model(obs)

                def baseline():
                    model.value_from_features(model.trunk(obs))

                def sample():
                    sample_actions(logits, mask_t, 1.0, gen)

                r_full = _rate(full, b, args.min_time)
                r_base = _rate(baseline, b, args.min_time)
                r_sample = _rate(sample, b, args.min_time)
            rows[str(b)] = {
                "forward": round(r_full, 1),
                "baseline_trunk_value": round(r_base, 1),
                "sample": round(r_sample, 1),
                "act_estimate": round(1.0 / (1.0 / r_full + 1.0 / r_sample), 1),
                "policy_head_share": round(max(0.0, 1.0 - r_full / r_base), 3),
                "gflops": round(2 * macs * r_full / 1e9, 2),
            }
        out["configs"][name] = {"parameters": count_parameters(model), "macs_per_position": macs, "batches": rows}
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
