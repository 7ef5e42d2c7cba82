"""Self-play rate of the worker's step against bare inference of the same net at the same batch.

Prints one JSON object: positions/s of ``keisei_stream.rl.selfplay.selfplay_step`` (observations, masks,
one forward pass, masked sampling, trajectory writes, env step with auto-reset) for N games at
once, and, measured in the same run and process, the bare forward pass of the same model on a
batch of N real observations (the baseline), and their ratio (goal: >= 0.8).

    python benchmarks/selfplay.py [--config configs/quickstart.yaml] [--games 64] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from keisei_stream.config import load_config
from keisei_stream.rl.model import build_model, count_parameters
from keisei_stream.shogi import VecEnv
from keisei_stream.rl.selfplay import Trajectories, selfplay_step


def _rate(fn, n_per_call: int, seconds: float) -> float:
    fn()  # warm-up
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += n_per_call
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--games", type=int, default=None, help="games at once (default: config worker.games)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    cfg = load_config(args.config)
    n = args.games or cfg.worker.games
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    env = VecEnv(n, cfg.env.max_plies, seed=0)
    traj = Trajectories.empty(n, cfg.env.max_plies)
    rng = torch.Generator().manual_seed(0)
    games = [0]

    def step() -> None:
        _, finished = selfplay_step(env, model, traj, 1, cfg.worker.temperature, rng)
        games[0] += len(finished)

    obs, _ = env.observe()
    x = torch.from_numpy(obs)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    # Interleave the two measurements so that background load affects both alike.
    half = args.seconds / 2
    sp = [_rate(step, n, half), _rate(step, n, half)]
    inf = [_rate(forward, n, half), _rate(forward, n, half)]
    sp.append(_rate(step, n, half))
    inf.append(_rate(forward, n, half))
    selfplay, bare = max(sp), max(inf)
    print(json.dumps({
        "benchmark": "selfplay", "config": args.config, "games_at_once": n, "threads": args.threads,
        "parameters": count_parameters(model), "max_plies": cfg.env.max_plies,
        "selfplay_positions_per_s": round(selfplay, 1),
        "baseline_bare_forward_positions_per_s": round(bare, 1),
        "ratio_selfplay_to_bare_forward": round(selfplay / bare, 3),
        "goal_ratio": 0.8, "games_finished": games[0],
        "cpu": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
