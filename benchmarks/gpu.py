"""One GPU check in one call: is a GPU machine used the way keisei-stream means to use it?

    python benchmarks/gpu.py --minutes 4          # one H100/H200: about 4 minutes, at most 6
    python benchmarks/gpu.py --cpu --minutes 1.5  # the same steps on the CPU (tiny config): a dry run

Runs, in order, each part in its own process session with a time limit (a part that fails
reports its error and the rest still run), and prints one JSON object:

1. ``tests``: the CUDA paths' tests (``pytest -k cuda`` and ``tests/test_gpu_path.py``: a worker
   step and a learner update under ``torch.cuda.set_sync_debug_mode("error")``, flush after the
   copies, events on the worker's device), passed / failed / skipped;
2. ``limit``: the learner's own rate at the run's settings, **the limit**:
   ``benchmarks/learner.py --parts update`` (``Trainer.update`` on real self-play segments: the
   rebuild, GAE, the proximal pass and every one of ``ppo.epochs`` epochs), on the same GPU;
3. ``selfplay``: one worker's self-play positions/s on the device (``benchmarks/selfplay.py``);
4. ``run``: a whole ``keisei run`` of the config on a private Redis that this script starts (so
   that the ``metrics`` stream can be read after the run), for the rest of the budget, with the
   SMs' activity sampled every second. Rates are taken over the **steady window**, from the end
   of the first update to the stop (``control=stop``), from the metrics stream (trained, stale)
   and a once-a-second poll of the accounting (produced); what the learner trains after the stop
   (the drain) is reported apart, with its duration. ``trained_per_s / limit`` is printed: the
   acceptance is >= 0.8, first update <= 60 s, stale <= 1 %, discarded at the stop <= 2 %, the
   accounting balanced.

SM activity: NVML's GPM metrics (``NVML_GPM_METRIC_SM_UTIL``: the share of SMs busy, and
``NVML_GPM_METRIC_SM_OCCUPANCY``: resident warps over the maximum; Hopper and later, through
nvidia-ml-py), which tell a GPU doing work from one kept "busy" by many tiny kernel launches; where
GPM is not supported the result says so and gives NVML's utilisation instead (the share of time
any kernel ran), named as such.

Children are started with ``PYTHONPATH`` **prepended** with this checkout (a machine whose packages
come through ``PYTHONPATH`` keeps them), each in a session of its own; on a timeout the whole tree
(``keisei run``'s children run in sessions of their own too) is sent SIGTERM, then SIGKILL, and the
private Redis is stopped whatever happens. Without CUDA (and without ``--cpu``) it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Seconds a run gets to stop (workers send their last segments, the learner drains, checkpoints).
STOP_ALLOWANCE_S = 50.0
#: The acceptance figures the result is checked against (issue 25).
ACCEPT = {"ratio_to_limit": 0.8, "first_update_s": 60.0, "stale_share": 0.01, "discarded_share": 0.02}


# ------------------------------------------------------------------------------ children
def child_env(extra: dict | None = None) -> dict:
    """The environment of a child: ours, with this checkout **prepended** to ``PYTHONPATH``."""
    old = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + old if old else ""), "PYTHONUNBUFFERED": "1",
            **(extra or {})}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children in sessions of their own included), from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def kill_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM ``pid``'s process group and every descendant's (each may have its own session),
    up to ``grace_s`` seconds for them to go, then SIGKILL what is left."""
    procs = [pid, *descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            for kill in (lambda: os.killpg(os.getpgid(p), sig), lambda: os.kill(p, sig)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError, OSError):
                    pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purpose
        return (Path("/proc") / str(pid) / "stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def run_child(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own session; on a timeout kill its whole tree. Returns ``(exit status or
    None when killed, stdout + stderr)``."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=child_env(env), start_new_session=True)
    try:
        out, _ = p.communicate(timeout=max(1.0, timeout))
        return p.returncode, out
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, _ = p.communicate()
        return None, out + f"\n[gpu.py] killed after {timeout:.0f} s"


def _json_out(text: str) -> dict:
    """The JSON object a benchmark printed (the last one; it may span lines)."""
    starts = [m.start() for m in re.finditer(r"(?m)^\{", text)]
    for s in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text[s:])[0]
        except ValueError:
            continue
    raise ValueError(f"no JSON object in the output: {text[-500:]}")


# ------------------------------------------------------------------------------ the steady window
def steady_window(metrics: list[tuple[float, dict]], stop_t: float, produced: list[tuple[float, int]]) -> dict:
    """Rates over the steady window of a run, and its drain, from what the run recorded.

    Args:
        metrics: ``(unix time of the entry, fields)`` of every ``metrics`` stream entry, oldest
            first (one per update; ``trained_positions``, ``stale_positions``).
        stop_t: unix time the stop began (``control=stop`` seen).
        produced: ``(unix time, produced positions so far)`` samples of the accounting, oldest first.

    Returns:
        ``window_s`` (from the end of the first update to the stop), ``updates``,
        ``trained_positions``, ``trained_per_s``, ``stale_share`` (of what the window's updates
        held), ``produced_per_s`` (the accounting's growth over the window, interpolated),
        ``drain`` (``updates``, ``trained_positions``, ``seconds``: from the stop to the last
        update), ``first_update_t``. The first update's own positions were trained before the
        window began: they are not counted.
    """
    if not metrics:
        return {"error": "no update in the metrics stream"}
    first_t = metrics[0][0]
    inside = [(t, m) for t, m in metrics[1:] if t <= stop_t]
    after = [(t, m) for t, m in metrics[1:] if t > stop_t]
    window = max(stop_t - first_t, 1e-9)
    trained = sum(int(float(m.get("trained_positions", 0))) for _, m in inside)
    stale = sum(int(float(m.get("stale_positions", 0))) for _, m in inside)

    def produced_at(t: float) -> float:
        if not produced:
            return 0.0
        if t <= produced[0][0]:
            return float(produced[0][1])
        for (t0, p0), (t1, p1) in zip(produced, produced[1:]):
            if t0 <= t <= t1:
                return p0 + (p1 - p0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return float(produced[-1][1])

    return {
        "first_update_t": first_t, "window_s": round(window, 1), "updates": len(inside),
        "trained_positions": trained, "trained_per_s": round(trained / window, 1),
        "stale_share": round(stale / max(trained + stale, 1), 4),
        "produced_per_s": round((produced_at(stop_t) - produced_at(first_t)) / window, 1),
        "drain": {"updates": len(after), "trained_positions": sum(int(float(m.get("trained_positions", 0)))
                                                                  for _, m in after),
                  "seconds": round(after[-1][0] - stop_t, 1) if after else 0.0},
    }


# ------------------------------------------------------------------------------ SM activity
class SmSampler(threading.Thread):
    """SM activity of GPU 0 every second until stopped (module docstring): GPM ``SM_UTIL`` and
    ``SM_OCCUPANCY`` where supported, else NVML's utilisation (named in :meth:`summary`)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self.nv, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        try:
            self.gpm = bool(pynvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice)
        except Exception:  # noqa: BLE001 - old driver or binding: fall back
            self.gpm = False
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def _gpm_pair(self, a, b) -> dict:
        nv = self.nv
        mg = nv.c_nvmlGpmMetricsGet_t()
        mg.version, mg.numMetrics, mg.sample1, mg.sample2 = nv.NVML_GPM_METRICS_GET_VERSION, 2, a, b
        mg.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
        mg.metrics[1].metricId = nv.NVML_GPM_METRIC_SM_OCCUPANCY
        nv.nvmlGpmMetricsGet(mg)
        return {"sm_util_pct": mg.metrics[0].value, "sm_occupancy_pct": mg.metrics[1].value}

    def run(self) -> None:
        nv = self.nv
        prev = cur = None
        if self.gpm:
            prev, cur = nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self.handle, prev)
        while not self.stop.wait(1.0):
            s = {"t": time.time(), "utilization_pct": float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)}
            if self.gpm:
                try:
                    nv.nvmlGpmSampleGet(self.handle, cur)
                    s.update(self._gpm_pair(prev, cur))
                    prev, cur = cur, prev
                except Exception as exc:  # noqa: BLE001 - keep the utilisation figure
                    s["gpm_error"] = str(exc)[:100]
            self.samples.append(s)

    def summary(self, t0: float | None = None, t1: float | None = None) -> dict:
        """Means over the samples between ``t0`` and ``t1`` (unix times; all when None)."""
        s = [x for x in self.samples if (t0 is None or x["t"] >= t0) and (t1 is None or x["t"] <= t1)] or [{}]

        def mean(k: str) -> float | None:
            v = [x[k] for x in s if k in x]
            return round(sum(v) / len(v), 1) if v else None

        out = {"samples": len([x for x in s if x]), "utilization_mean_pct": mean("utilization_pct"),
               "utilization_metric": "NVML utilisation: share of time any kernel ran (reads high when launch-bound)"}
        if self.gpm:
            out.update({"sm_util_mean_pct": mean("sm_util_pct"), "sm_occupancy_mean_pct": mean("sm_occupancy_pct"),
                        "sm_metric": "NVML GPM SM_UTIL (share of SMs busy) and SM_OCCUPANCY (resident warps / max)"})
        else:
            out["sm_metric"] = "GPM not supported here: only NVML utilisation is known (it cannot tell busy SMs from launches)"
        return out


# ------------------------------------------------------------------------------ the parts
def cuda_tests(timeout: float) -> dict:
    """``pytest -k cuda`` plus the GPU path's tests: the counts of the summary line."""
    rc, out = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_path.py",
                         "tests/test_ppo.py", "tests/test_model.py", "tests/test_selfplay.py", "tests/test_search.py",
                         "-k", "cuda or gpu_path"], timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", out)}
    failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
            + counts.get("errors", 0), "skipped": counts.get("skipped", 0), "ok": rc == 0, "failures": failed[:10],
            **({"tail": out[-1500:]} if rc != 0 else {})}


def learner_limit(config: str, device: str, timeout: float) -> dict:
    """The learner's own positions/s at the run's settings (``benchmarks/learner.py --parts update``)."""
    cmd = [sys.executable, "benchmarks/learner.py", "--configs", Path(config).stem, "--parts", "update", "--device",
           device, "--repeats", "2"] + (["--threads", "1"] if device == "cpu" else [])
    rc, out = run_child(cmd, timeout)
    r = _json_out(out)
    return {"device": r.get("device_name", r.get("device")), **r["configs"][Path(config).stem]}


def selfplay_rate(config: str, device: str, seconds: float, timeout: float) -> dict:
    """One worker's self-play positions/s on ``device`` (``benchmarks/selfplay.py``)."""
    rc, out = run_child([sys.executable, "benchmarks/selfplay.py", "--config", config, "--device", device,
                         "--seconds", str(seconds)], timeout)
    r = _json_out(out)
    return {k: r.get(k) for k in ("device", "games_at_once", "groups", "selfplay_positions_per_s",
                                  "baseline_bare_forward_positions_per_s", "ratio_selfplay_to_bare_forward")}


def whole_run(config: str, duration: float, workers: int | None, cpu: bool, sampler: SmSampler | None,
              record: str | None = None) -> dict:
    """``keisei run`` for ``duration`` seconds on a private Redis started here (stopped here
    whatever happens), the accounting polled every second; the steady window's figures."""
    from keisei_stream.cli.status import collect_status
    from keisei_stream.ops.embedded_redis import start_redis
    from keisei_stream.wire import status as wstatus
    from keisei_stream.wire.client import connect
    from keisei_stream.wire.keys import Keys

    run_id, tmp = "gpubench", Path(tempfile.mkdtemp(prefix="keisei-gpu-"))
    keys = Keys(run_id)
    server = start_redis(tmp / "redis", maxmemory="8gb")
    r = None
    try:
        r = connect(server.url)
        cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", config, "--redis", server.url,
               "--duration", f"{duration:.0f}s", "--no-live", "--print-every", "10", "--run", run_id,
               "--learner-stop-timeout", str(int(STOP_ALLOWANCE_S)), "--set", f"run.dir={tmp}"]
        cmd += ["--workers", str(workers)] if workers else []
        cmd += ["--set", "learner.device=cpu", "--set", "worker.device=cpu"] if cpu else []
        launched = time.time()
        log_path = tmp / "keisei-run.out"
        with open(log_path, "w") as log:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                 start_new_session=True)
        produced: list[tuple[float, int]] = []
        stop_t, verdict, killed = None, None, False
        deadline = time.monotonic() + duration + STOP_ALLOWANCE_S + 40
        while p.poll() is None:
            if time.monotonic() > deadline:
                kill_tree(p.pid, grace_s=15)
                killed = True
                break
            now = time.time()
            try:
                produced.append((now, wstatus.read_accounting(r, keys)["produced_positions"]))
                if stop_t is None and wstatus.get_control(r, keys) == "stop":
                    stop_t = now
                if verdict is None and now - launched > 0.8 * duration:
                    verdict = collect_status(r, run_id)["bottleneck"]
            except Exception:  # noqa: BLE001 - the poll is best effort; the run goes on
                pass
            time.sleep(1.0)
        p.wait()
        metrics = [(int(i.decode().split("-")[0]) / 1000.0, {k.decode(): v.decode() for k, v in f.items()})
                   for i, f in r.xrange(keys.metrics)]
        stop_t = stop_t or launched + duration
        if record:  # what steady_window reads, for tests/test_gpu_bench.py
            Path(record).write_text(json.dumps({"launched": launched, "stop_t": stop_t, "produced": produced,
                                                "metrics": metrics}))
        steady = steady_window(metrics, stop_t, produced)
        acc = wstatus.read_accounting(r, keys)
        ln = wstatus.read_learner_status(r, keys)
        length = wstatus.stream_info(r, keys)["length"]
        settled = sum(acc.get(k, 0) for k in ("trained_positions", "stale_positions", "rejected_positions",
                                              "duplicate_positions"))
        discarded = acc.get("worker_discarded_positions", 0)
        compiled_at = next((t for t, m in metrics if float(m.get("compiled", 0) or 0) > 0), None)
        out = {
            "exit_status": p.returncode, "killed_on_timeout": killed, "duration_s": round(duration),
            "wall_s": round(time.time() - launched, 1),
            "first_update_after_launch_s": round(steady["first_update_t"] - launched, 1) if "first_update_t" in steady else None,
            "time_to_first_update_s": _num(ln.get("time_to_first_update_s")),
            "compiled_after_launch_s": round(compiled_at - launched, 1) if compiled_at else None,
            "compile_state": ln.get("compile"), "steady": steady, "bottleneck_near_end": verdict,
            "discarded_share": round(discarded / max(acc.get("produced_positions", 0) + discarded, 1), 4),
            "balanced": acc.get("produced_positions", 0) == settled and length == 0,
            "accounting": acc, "versions": _num(ln.get("version")),
            "log": [ln_ for ln_ in log_path.read_text().splitlines() if ln_[:1] not in "┏┃┡│└ " and ln_.strip()][-12:],
        }
        if sampler is not None:
            out["sm_steady"] = sampler.summary(steady.get("first_update_t"), stop_t)
        return out
    finally:
        if r is not None:
            r.close()
        server.stop()


def _num(v):
    try:
        return round(float(v), 1)
    except (TypeError, ValueError):
        return None


def _part(name: str, fn, *args) -> dict:
    t0 = time.monotonic()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failed part must not hide the others
        out = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"[gpu.py] {name}: {json.dumps(out)[:400]}", file=sys.stderr, flush=True)
    return out


def checks(result: dict) -> dict:
    """The acceptance figures of the result, each with its verdict (None when not measured)."""
    run, steady = result.get("run", {}), result.get("run", {}).get("steady", {})

    def le(v, lim):
        return None if v is None else v <= lim

    return {"ratio_to_limit >= 0.8": None if result.get("ratio_to_limit") is None
            else result["ratio_to_limit"] >= ACCEPT["ratio_to_limit"],
            "first_update <= 60 s": le(run.get("first_update_after_launch_s"), ACCEPT["first_update_s"]),
            "stale <= 1 %": le(steady.get("stale_share"), ACCEPT["stale_share"]),
            "discarded <= 2 %": le(run.get("discarded_share"), ACCEPT["discarded_share"]),
            "accounting balanced": run.get("balanced"), "cuda tests pass": result.get("tests", {}).get("ok")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0,
                    help="the whole call's target wall time (the run gets what the other parts leave); it ends "
                         "within minutes + 2 when parts time out")
    ap.add_argument("--config", default=None, help="run config (default configs/gpu.yaml; --cpu: configs/tiny.yaml)")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers of the run (default: 4 on a GPU, the sizing in docs/performance.md; --cpu: 1)")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU: the same steps, no GPU figure")
    ap.add_argument("--skip", default="", help="parts to skip, comma-separated: tests,limit,selfplay")
    ap.add_argument("--record", default=None, help="save the run's metrics entries, stop time and produced samples here")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "error": "no CUDA device: nothing to measure (--cpu: a dry run)"}))
        return 2
    config = args.config or ("configs/tiny.yaml" if args.cpu else "configs/gpu.yaml")
    device = "cpu" if args.cpu else "cuda"
    workers = args.workers or (1 if args.cpu else 4)
    skip = set(filter(None, args.skip.split(",")))
    budget, min_run = args.minutes * 60.0, (20.0 if args.cpu else 90.0)
    t0 = time.monotonic()
    result = {"benchmark": "gpu", "mode": "cpu dry run (no GPU figure)" if args.cpu else "gpu",
              "device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda": torch.version.cuda, "cpus": os.cpu_count(), "config": config, "workers": workers,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        result["commit"] = None
    if "tests" not in skip:
        result["tests"] = _part("tests", cuda_tests, 60 if not args.cpu else 120)
    if "limit" not in skip:
        result["limit"] = _part("limit", learner_limit, config, device, 90)
    if "selfplay" not in skip:
        result["selfplay"] = _part("selfplay", selfplay_rate, config, device, 6, 40)
    sampler = None
    if not args.cpu:
        try:
            sampler = SmSampler()
            sampler.start()
        except Exception as exc:  # noqa: BLE001 - no NVML: the run's figures are still worth having
            result["sm_error"] = f"NVML unavailable: {exc}"
    duration = max(min_run, budget - (time.monotonic() - t0) - STOP_ALLOWANCE_S)
    result["run"] = _part("run", whole_run, config, duration, workers, args.cpu, sampler, args.record)
    if sampler is not None:
        sampler.stop.set()
    limit = result.get("limit", {}).get("update_positions_per_s")
    trained = result["run"].get("steady", {}).get("trained_per_s")
    result["limit_positions_per_s"] = limit
    result["trained_per_s"] = trained
    result["ratio_to_limit"] = round(trained / limit, 3) if limit and trained is not None else None
    result["checks"] = checks(result)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result))
    print(f"[gpu.py] trained {trained} positions/s in the steady window, limit {limit} positions/s: "
          f"trained_per_s / limit = {result['ratio_to_limit']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
