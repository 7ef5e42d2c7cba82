"""Learning per position with more workers: train the same config to the same number of trained
positions with different worker layouts (default 8 workers x 8 games and 1 worker x 64 games),
then play each final checkpoint against the random and the greedy player.

For each layout ``WxG``: one whole local run (``python -m keisei_stream.cli run --workers W
--games G --no-live``, a private Redis, a temporary run directory), stopped with SIGTERM (an
ordered stop: workers, then the learner drains, updates and checkpoints) as soon as the run's
``accounting`` hash shows ``--positions`` trained positions; then ``keisei eval`` of the final
checkpoint, ``--eval-games`` games against each opponent with argmax moves. The layouts are
measured in the same invocation, one after the other, on the same machine: each is the other's
baseline. Prints one JSON object: per layout the trained positions at the stop, versions, wall
seconds and, per opponent, wins/losses/draws, score and Elo with its 95 % interval, and whether
the layouts' intervals overlap ("equal strength within the confidence interval").

    PYTHONPATH=$PWD python benchmarks/strength_per_position.py                 # 500,000 positions
    PYTHONPATH=$PWD python benchmarks/strength_per_position.py --positions 100000 --eval-games 50
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keisei_stream.wire.client import connect  # noqa: E402
from keisei_stream.wire.keys import Keys  # noqa: E402
from keisei_stream.wire.status import read_accounting  # noqa: E402


def train(workers: int, games: int, positions: int, config: str, base: Path, sets: list[str]) -> dict:
    """One run of ``workers`` x ``games`` until ``positions`` are trained; its final checkpoint."""
    run_id = f"spp{workers}x{games}"
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", config, "--workers", str(workers),
           "--games", str(games), "--no-live", "--print-every", "60", "--set", f"run.dir={base}",
           "--set", f"run.id={run_id}"]
    for s in sets:
        cmd += ["--set", s]
    log = open(base / f"{run_id}.out", "wb")  # noqa: SIM115 - closed below
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url_file = base / run_id / "redis.url"
    while not url_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"keisei run exited with {proc.returncode} (see {log.name})")
        time.sleep(0.5)
    r, keys = connect(url_file.read_text().strip()), Keys(run_id)
    while read_accounting(r, keys).get("trained_positions", 0) < positions:
        if proc.poll() is not None:
            raise RuntimeError(f"keisei run exited with {proc.returncode} (see {log.name})")
        time.sleep(1.0)
    train_s = time.monotonic() - t0
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    log.close()
    final = json.loads((base / run_id / "final_status.json").read_text())
    ckpts = sorted((base / run_id / "checkpoints").glob("ckpt_*.pt"))
    return {"workers": workers, "games": games, "train_s": round(train_s, 1),
            "trained_positions": int(final["accounting"].get("trained_positions", 0)),
            "stale_positions": int(final["accounting"].get("stale_positions", 0)),
            "version": int(final["learner"].get("version", 0)), "checkpoint": str(ckpts[-1])}


def evaluate(checkpoint: str, opponent: str, games: int, processes: int, out: Path) -> dict:
    """``keisei eval`` of ``checkpoint`` against ``opponent`` (argmax, 512 plies at most)."""
    cmd = [sys.executable, "-m", "keisei_stream.cli", "eval", "--checkpoint", checkpoint, "--opponent", opponent,
           "--games", str(games), "--max-plies", "512", "--processes", str(processes), "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
    d = json.loads(out.read_text())
    return {k: d[k] for k in ("games", "wins", "losses", "draws", "score", "elo", "elo_lo", "elo_hi")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="8x8,1x64", help="comma-separated WORKERSxGAMES")
    ap.add_argument("--positions", type=int, default=500_000, help="trained positions per layout")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for every run")
    ap.add_argument("--opponents", default="random,greedy")
    ap.add_argument("--eval-games", type=int, default=200)
    ap.add_argument("--processes", type=int, default=2, help="evaluation processes")
    ap.add_argument("--keep", default=None, help="keep run directories here (default: a temp dir)")
    args = ap.parse_args()
    out: dict = {"benchmark": "strength_per_position", "cpu_count": os.cpu_count(), "config": args.config,
                 "positions": args.positions, "eval_games": args.eval_games, "layouts": []}
    with tempfile.TemporaryDirectory(prefix="spp-") as tmpd:
        base = Path(args.keep).resolve() if args.keep else Path(tmpd)
        base.mkdir(parents=True, exist_ok=True)
        for layout in args.layouts.split(","):
            w, g = (int(x) for x in layout.lower().split("x"))
            res = train(w, g, args.positions, args.config, base, args.sets)
            res["eval"] = {opp: evaluate(res["checkpoint"], opp, args.eval_games, args.processes,
                                         base / f"eval-{layout}-{opp}.json") for opp in args.opponents.split(",")}
            out["layouts"].append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
        for opp in args.opponents.split(","):
            ivs = [(lay["eval"][opp]["elo_lo"], lay["eval"][opp]["elo_hi"]) for lay in out["layouts"]]
            lo = max((a for a, _ in ivs if a is not None), default=None)
            hi = min((b for _, b in ivs if b is not None), default=None)
            out[f"intervals_overlap_{opp}"] = None if lo is None or hi is None else lo <= hi
    print(json.dumps(out))


if __name__ == "__main__":
    main()
