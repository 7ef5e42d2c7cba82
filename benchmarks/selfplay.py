"""Self-play rate of the worker's step against bare inference of the same net at the same batch.

Prints one JSON object: positions/s of ``keisei_stream.rl.selfplay.SelfPlay.step`` (observations,
masks, one forward pass per group, masked sampling, trajectory writes, segments, env step with
auto-reset) for N games at once on ``--device``, and, measured in the same run and process, the
bare forward pass of the same model on the same device on a batch of one group's real
observations (the baseline), and their ratio (goal on the CPU: >= 0.8; on a GPU the forward pass
overlaps the boards' stepping, so the ratio says how much of the device's rate the CPU side keeps).

    python benchmarks/selfplay.py [--config configs/quickstart.yaml] [--games 64] [--seconds 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from keisei_stream.config import load_config
from keisei_stream.rl.model import build_model, count_parameters, pick_device
from keisei_stream.rl.selfplay import SelfPlay


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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, auto")
    p.add_argument("--groups", type=int, default=None, help="groups of games (default: 2 on CUDA, else 1)")
    args = p.parse_args()
    cfg = load_config(args.config)
    n = args.games or cfg.worker.games
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    sp = SelfPlay(model, games=n, max_plies=cfg.env.max_plies, segment_plies=cfg.worker.segment_plies,
                  lookahead_plies=cfg.worker.lookahead_plies, gamma=cfg.ppo.gamma, lam=cfg.ppo.gae_lambda,
                  temperature=cfg.worker.temperature, seed=0, device=device, groups=args.groups, amp=cfg.worker.amp)
    games = [0]

    def step() -> None:
        games[0] += len(sp.step(1).finished)

    obs, _ = sp.groups[0].env.observe()
    x = torch.from_numpy(obs).to(device)
    use_amp = cfg.worker.amp and device.type == "cuda"

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Interleave the two measurements so that background load affects both alike.
    half = args.seconds / 2
    group = sp.groups[0].env.num_games
    rates = [_rate(step, n, half), _rate(step, n, half)]
    inf = [_rate(forward, group, half), _rate(forward, group, half)]
    rates.append(_rate(step, n, half))
    inf.append(_rate(forward, group, half))
    selfplay, bare = max(rates), max(inf)
    print(json.dumps({
        "benchmark": "selfplay", "config": args.config, "games_at_once": n, "threads": args.threads,
        "device": str(device), "groups": len(sp.groups), "overlap": sp.overlap, "games_per_forward": group,
        "parameters": count_parameters(model), "max_plies": cfg.env.max_plies,
        "selfplay_positions_per_s": round(selfplay, 1),
        "baseline_bare_forward_positions_per_s": round(bare, 1),
        "ratio_selfplay_to_bare_forward": round(selfplay / bare, 3),
        "goal_ratio": 0.8, "games_finished": games[0],
        "cpu": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
