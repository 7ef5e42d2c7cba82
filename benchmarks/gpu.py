"""One GPU check in one command: is a GPU machine used the way keisei-stream means to use it?

    python benchmarks/gpu.py --minutes 4

Runs, in order, and prints one JSON object with everything it measured:

1. ``tests``: the CUDA paths' tests (``pytest -k cuda``: the learner's bf16 PPO update, the CUDA
   worker path, the search on CUDA), passed / failed / skipped;
2. ``learner``: ``benchmarks/learner.py --configs gpu``: PPO samples/s of the gpu net against its
   bare forward pass (the same minibatches, same run);
3. ``selfplay``: ``benchmarks/selfplay.py --config configs/gpu.yaml`` on the GPU and on the CPU:
   one worker's positions/s with the forward pass on each device;
4. ``run``: a whole ``keisei run --config configs/gpu.yaml`` for the rest of ``--minutes`` (at
   least 90 s), with the GPU's busy share (NVML ``nvmlDeviceGetUtilizationRates().gpu``, the share
   of the last sample period in which a kernel ran; nvidia-ml-py) sampled every second: produced
   and trained positions/s, the stale share, the time to the first update, the share of played
   positions discarded at the stop, and whether the accounting balances.

Every part runs in its own process with a time limit; a part that fails reports its error and the
rest still run. It is meant to finish within ``--minutes`` + 2 minutes on a 16-core, one-GPU
machine. No GPU, no figures: without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _json_tail(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON line in the output")


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def cuda_tests(timeout: float) -> dict:
    """``pytest -k cuda`` over the suite: the counts of its summary line."""
    p = _run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider"], timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", p.stdout)}
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
            "skipped": counts.get("skipped", 0), "ok": p.returncode == 0}


def learner_rate(timeout: float) -> dict:
    """PPO samples/s of the gpu net vs its bare forward (``benchmarks/learner.py``)."""
    out = json.loads(_run([sys.executable, "benchmarks/learner.py", "--configs", "gpu"], timeout).stdout)
    return {"device": out.get("device"), **out["configs"]["gpu"]}


def selfplay_rates(seconds: float, timeout: float) -> dict:
    """One worker's self-play positions/s with the gpu net on the GPU and on the CPU."""
    out = {}
    for device in ("cuda", "cpu"):
        r = _json_tail(_run([sys.executable, "benchmarks/selfplay.py", "--config", "configs/gpu.yaml", "--device",
                             device, "--seconds", str(seconds)], timeout).stdout)
        out[device] = {"positions_per_s": r["selfplay_positions_per_s"],
                       "bare_forward_positions_per_s": r["baseline_bare_forward_positions_per_s"],
                       "games_at_once": r["games_at_once"], "groups": r["groups"]}
    out["gpu_over_cpu"] = round(out["cuda"]["positions_per_s"] / max(out["cpu"]["positions_per_s"], 1e-9), 2)
    return out


class _GpuSampler(threading.Thread):
    """NVML utilisation of GPU 0 every second until stopped (``samples``: percentages)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append(int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def summary(self) -> dict:
        s = self.samples or [0]
        return {"samples": len(self.samples), "busy_mean_pct": round(sum(s) / len(s), 1),
                "busy_share_pct": round(100.0 * sum(1 for x in s if x > 0) / len(s), 1),
                "zero_samples": sum(1 for x in s if x == 0)}


def whole_run(seconds: float, workers: int | None) -> dict:
    """``keisei run --config configs/gpu.yaml`` for ``seconds`` in a temporary run directory,
    with the GPU sampled; figures from its final status."""
    run_dir = Path(tempfile.mkdtemp(prefix="keisei-gpu-"))
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", "configs/gpu.yaml", "--duration",
           f"{seconds:.0f}s", "--no-live", "--run", "gpubench", "--set", f"run.dir={run_dir}"]
    if workers:
        cmd += ["--workers", str(workers)]
    try:
        sampler = _GpuSampler()
        sampler.start()
    except Exception as exc:  # noqa: BLE001 - no NVML: the run's figures are still worth having
        sampler = None
        gpu = {"error": f"NVML unavailable: {exc}"}
    t0 = time.monotonic()
    p = _run(cmd, seconds + 240)
    wall = time.monotonic() - t0
    if sampler is not None:
        sampler.stop.set()
        gpu = sampler.summary()
    status = json.loads((run_dir / "gpubench" / "final_status.json").read_text())
    acc, lrn = status.get("accounting", {}), status.get("learner", {})
    produced, trained = int(acc.get("produced_positions", 0)), int(acc.get("trained_positions", 0))
    stale, discarded = int(acc.get("stale_positions", 0)), int(acc.get("worker_discarded_positions", 0))
    settled = trained + stale + int(acc.get("rejected_positions", 0)) + int(acc.get("duplicate_positions", 0))
    return {
        "seconds": round(wall, 1), "exit_status": p.returncode, "gpu": gpu,
        "produced_positions_per_s": round(produced / seconds, 1), "trained_positions_per_s": round(trained / seconds, 1),
        "stale_share": round(stale / max(produced, 1), 4), "discarded_share": round(discarded / max(produced + discarded, 1), 4),
        "time_to_first_update_s": lrn.get("time_to_first_update_s"), "versions": lrn.get("version"),
        "balanced": produced == settled and int(status.get("stream", {}).get("length", 0) or 0) == 0,
        "accounting": acc, "run_dir": str(run_dir),
    }


def _part(name: str, fn, *args) -> dict:
    t0 = time.monotonic()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failed part must not hide the others
        out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"[gpu.py] {name}: {json.dumps(out)[:300]}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="the whole check's budget (the run gets the rest)")
    ap.add_argument("--workers", type=int, default=None, help="workers of the run (default: keisei run's choice)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "error": "no CUDA device: nothing to measure"}))
        return 2
    t0 = time.monotonic()
    result = {"benchmark": "gpu", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cpus": os.cpu_count()}
    result["tests"] = _part("tests", cuda_tests, 240)
    result["learner"] = _part("learner", learner_rate, 240)
    result["selfplay"] = _part("selfplay", selfplay_rates, 10, 120)
    left = max(90.0, args.minutes * 60 - (time.monotonic() - t0))
    result["run"] = _part("run", whole_run, left, args.workers)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
