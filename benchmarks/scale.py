"""Scale-out benchmark: W worker processes against 1 or more learner ranks, and what one Redis carries.

Part 1 (``--workers 1,2,4,8,16``, ``--learners 1,2``): for each L and W, one whole local run
(``python -m keisei_stream.cli run``: private Redis with ACL users and AOF everysec, L learner
ranks under torchrun when L > 1, W workers of ``--games`` games each) in a temporary run directory. This script reads the run's Redis (admin URL from
``{run.dir}/{run.id}/redis.url``) about once a second while it runs: the ``accounting`` hash, the
``metrics`` stream (one entry per update, its id = the time the version was published), the
workers' heartbeat hashes and ``weights:latest``. The measurement window opens when every worker's
heartbeat says it is playing with loaded weights (process start-up is excluded) and closes when the
run is told to stop: after ``--seconds`` (SIGTERM to ``keisei run``, which stops workers, lets the
learner drain, and writes ``final_status.json``), or with ``--exact-duration`` after keisei's own
``--duration`` counted from its start. Per W it reports positions produced and trained per second
in the window, stale share, policy lag and importance-weight truncation per update, the workers'
backpressure share, the longest gap between published versions and whether the final accounting
balances (produced == trained + stale + rejected + duplicate, nothing left in the stream).
Baseline in the same run: the W=1 point (``speedup_vs_w1``).

Part 2 (``--capacity-entries N``): per-entry cost of the experience stream on one private Redis
(unix socket, AOF everysec as ``keisei run`` uses) with realistic entries (``batches.
benchmark_batches``: random games cut into segments, incompressible floats, ``--batch-positions`` positions):
the producer's add (phase ``producer_lua_xadd``, its name from when it was a Lua script; since
issue 23: credit check XLEN + HGET, WATCH + XREVRANGE of the worker's record, MULTI XADD + XADD
EXEC), the learner's XREADGROUP and XACK+XDEL+HINCRBY (``Consumer.read``/``Consumer.ack``,
structural validation only), the memory
each unacknowledged entry holds (``INFO memory`` used_memory delta), and the server's own CPU
seconds per entry (``INFO cpu`` of the main thread: what bounds a single-threaded server, unlike
this Python client). Baseline in the same run: raw XADD / XREADGROUP / XACK+XDEL of the same bytes.

Prints one JSON object.
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

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from keisei_stream.wire import codec
from keisei_stream.wire.consumer import Consumer, ensure_group
from keisei_stream.ops.embedded_redis import start_redis
from keisei_stream.wire.client import as_str, connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import read_accounting, read_workers, register_workers

ROOT = Path(__file__).resolve().parent.parent
from batches import benchmark_batches  # this script's folder is on sys.path

PLAYING = ("playing", "backpressure")


# ---------------------------------------------------------------------------------------------- part 1
def _quantiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "max": None}
    a = np.asarray(xs, dtype=float)
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p90": round(float(np.percentile(a, 90)), 3), "max": round(float(a.max()), 3)}


def _weighted_mean(values: list[float], weights: list[float]) -> float | None:
    w = float(sum(weights))
    return round(float(np.dot(values, weights) / w), 4) if w > 0 else None


class Poller:
    """What this script reads from the run's Redis about once a second."""

    def __init__(self, r, keys: Keys):
        self.r, self.keys = r, keys
        self.metrics: list[tuple[float, dict[str, str]]] = []  # (unix time of the entry id, fields)
        self.last_id = "-"
        self.samples: list[tuple[float, dict[str, int]]] = []  # (unix time, accounting)
        self.workers: dict[str, dict[str, str]] = {}  # newest heartbeat per worker id
        self.bp_at: dict[str, list[tuple[float, float]]] = {}  # worker -> [(unix time, backpressure_s)]
        self.v1_created: float | None = None
        self.weights_bytes: int | None = None
        self.latest_version = 0

    def poll(self) -> None:
        r, keys = self.r, self.keys
        now = time.time()
        start = "-" if self.last_id == "-" else "(" + self.last_id
        for eid, fields in r.xrange(keys.metrics, min=start, max="+"):
            eid = as_str(eid)
            self.last_id = eid
            self.metrics.append((int(eid.split("-")[0]) / 1000.0, {as_str(k): as_str(v) for k, v in fields.items()}))
        self.samples.append((now, read_accounting(r, keys)))
        for w in read_workers(r, keys):
            self.workers[w["id"]] = w
            self.bp_at.setdefault(w["id"], []).append((now, float(w.get("backpressure_s", 0) or 0)))
        latest = r.hgetall(keys.weights_latest)
        if latest:
            latest = {as_str(k): as_str(v) for k, v in latest.items()}
            self.latest_version = int(latest.get("version", 0))
            self.weights_bytes = int(latest.get("bytes", 0) or 0)
            if self.latest_version == 1 and self.v1_created is None:
                self.v1_created = float(latest["created"])

    def playing(self) -> int:
        return sum(1 for w in self.workers.values() if w.get("state") in PLAYING and int(w.get("version", 0)) >= 1)


def run_point(w: int, games: int, seconds: float, config: str, sets: list[str], base: Path, exact: bool,
              warmup_timeout: float, log_dir: Path, learners: int = 1) -> dict:
    """One keisei run with ``w`` workers and ``learners`` learner ranks; the figures of its measurement window."""
    run_id = f"scale{w}" if learners == 1 else f"scale{w}x{learners}l"
    run_dir = base / run_id
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--config", config, "--workers", str(w),
           "--games", str(games), "--no-live", "--print-every", "60", "--set", f"run.dir={base}",
           "--set", f"run.id={run_id}", "--learners", str(learners)]
    for s in sets:
        cmd += ["--set", s]
    if exact:
        cmd += ["--duration", f"{seconds:g}s"]
    load0 = os.getloadavg()[0]
    out = open(log_dir / f"keisei-run-{run_id}.out", "wb")  # noqa: SIM115 - closed after the run
    t_launch = time.time()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url_path = run_dir / "redis.url"
    while not url_path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"keisei run exited with {proc.returncode} (log {out.name})")
        time.sleep(0.2)
    # no RetryForever here: once the run stops its server, a read must fail, not wait
    r = connect(url_path.read_text().strip(), retry=Retry(NoBackoff(), 0), socket_timeout=10.0)
    keys = Keys(run_id)
    p = Poller(r, keys)
    t_open = t_close = None
    stop_sent = False
    playing_at_open = 0
    while proc.poll() is None:
        try:
            p.poll()
            control = as_str(r.get(keys.control) or b"run")
        except (redis.RedisError, OSError):  # the server is stopping with the run
            break
        now = time.time()
        if t_open is None and (p.playing() >= w or now - t_launch > warmup_timeout):
            t_open, playing_at_open = now, p.playing()  # fewer than w: some worker never reported in time
        if t_close is None and control == "stop":
            t_close = p.samples[-2][0] if len(p.samples) > 1 else now
        if not exact and t_open is not None and not stop_sent and now - t_open >= seconds:
            t_close = now
            proc.send_signal(signal.SIGTERM)  # keisei run: ordered stop, drain, final_status.json
            stop_sent = True
        time.sleep(max(0.0, 1.0 - (time.time() - now)))
    proc.wait()
    out.close()
    t_end = time.time()
    final = json.loads((run_dir / "final_status.json").read_text())
    acc = final["accounting"]

    # window: accounting samples inside [t_open, t_close]
    t_close = t_close or t_end
    win = [(t, a) for t, a in p.samples if t_open <= t <= t_close]
    (ta, a0), (tb, a1) = win[0], win[-1]
    dt = max(tb - ta, 1e-9)
    produced_s = (a1["produced_positions"] - a0["produced_positions"]) / dt
    trained_s = (a1["trained_positions"] - a0["trained_positions"]) / dt
    stale_win = a1["stale_positions"] - a0["stale_positions"]
    produced_win = a1["produced_positions"] - a0["produced_positions"]

    # per-update metrics
    ms = [(t, m) for t, m in p.metrics]
    def f(m: dict[str, str], k: str) -> float:
        return float(m.get(k, 0) or 0)

    tp = [f(m, "trained_positions") for _, m in ms]
    lag_mean = [f(m, "policy_lag_mean") for _, m in ms]
    lag_max = [f(m, "policy_lag_max") for _, m in ms]
    trunc = [f(m, "is_weight_truncated") for _, m in ms]
    isw = [f(m, "is_weight_mean") for _, m in ms]
    shares = {k: _weighted_mean([f(m, f"time_share_{k}") for _, m in ms], [1.0] * len(ms))
              for k in ("wait", "decode", "rebuild", "train", "ack", "publish")}

    # version gaps: v1 published, every update's publish (metrics id), until the window closes
    times = ([p.v1_created] if p.v1_created else []) + [t for t, _ in ms if t <= t_close] + [t_close]
    gaps = np.diff(np.asarray(sorted(times))) if len(times) > 1 else np.zeros(0)
    in_window = [t for t, _ in ms if t_open <= t <= t_close]
    wgaps = np.diff(np.asarray([t_open] + in_window + [t_close]))

    # backpressure: per worker, the heartbeat's backpressure_s increase over the window
    bp = 0.0
    for pts in p.bp_at.values():
        inside = [(t, v) for t, v in pts if t_open - 2.5 <= t <= t_close + 2.5]
        if len(inside) >= 2:
            bp += inside[-1][1] - inside[0][1]
    settled = (acc["trained_positions"] + acc["stale_positions"] + acc["rejected_positions"]
               + acc["duplicate_positions"])
    stream = final.get("stream", {})
    updates_in_window = len(in_window)
    return {
        "workers": w, "games_per_worker": games,
        "load_avg_1m_at_start": round(load0, 2),
        "startup_s": round(t_open - t_launch, 1), "window_s": round(dt, 1),
        "workers_playing_at_open": playing_at_open,
        "produced_positions_per_s": round(produced_s, 1),
        "trained_positions_per_s": round(trained_s, 1),
        "stale_share_window": round(stale_win / produced_win, 5) if produced_win else None,
        "updates_in_window": updates_in_window,
        "updates_per_min": round(60 * updates_in_window / dt, 2),
        "version_gap_s": {"max_run": round(float(gaps.max()), 2) if len(gaps) else None,
                          "max_window": round(float(wgaps.max()), 2),
                          "mean_window": round(float(wgaps.mean()), 2)},
        "policy_lag_per_update": {"mean_weighted": _weighted_mean(lag_mean, tp), **{
            f"{k}_of_means": v for k, v in _quantiles(lag_mean).items()}, "max": max(lag_max) if lag_max else None},
        "is_weight_truncated_share": {"weighted": _weighted_mean(trunc, tp), **_quantiles(trunc)},
        "is_weight_mean_weighted": _weighted_mean(isw, tp),
        "backpressure_share": round(bp / (w * dt), 4),
        "learner_time_shares_mean": shares,
        "weights_blob_bytes": p.weights_bytes,
        "final": {
            "version": p.latest_version, "updates": len(ms),
            "produced": acc["produced_positions"], "trained": acc["trained_positions"],
            "stale": acc["stale_positions"], "rejected": acc["rejected_positions"],
            "duplicate": acc["duplicate_positions"],
            "worker_discarded_at_stop": acc.get("worker_discarded_positions", 0),
            "left_in_stream": stream.get("length"),
            "stale_share": round(acc["stale_positions"] / acc["produced_positions"], 5) if acc["produced_positions"] else None,
            "balanced": acc["produced_positions"] == settled and not stream.get("length"),
        },
        "run_total_s": round(t_end - t_launch, 1),
    }


# ---------------------------------------------------------------------------------------------- part 2
def _server_cpu(r) -> float:
    """CPU seconds of the server's main thread (whole process when the server does not say)."""
    info = r.info("cpu")
    if "used_cpu_user_main_thread" in info:
        return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _mem(r) -> int:
    return int(r.info("memory")["used_memory"])


def capacity(entries: int, batch_positions: int, max_plies: int, tmp: Path, weights_bytes: int) -> dict:
    """Per-entry cost of adding, reading and acknowledging experience entries on one server."""
    distinct = 16
    batches = benchmark_batches(distinct, batch_positions, max_plies=max_plies, num_games=4)
    encoded = [codec.encode_batch(b) for b in batches]
    pos_per_entry = sum(b.num_positions for b in batches) / distinct
    wire_per_entry = sum(codec.wire_bytes(f) for f in encoded) / distinct
    res: dict = {"entries": entries, "positions_per_entry": round(pos_per_entry, 1),
                 "wire_bytes_per_entry": round(wire_per_entry), "wire_bytes_per_position": round(wire_per_entry / pos_per_entry, 2)}
    with start_redis(tmp / "cap", maxmemory="4gb", appendonly=True, appendfsync="everysec") as server:
        r = connect(server.url)
        info = r.info("server")
        res["server"] = (f"valkey {info['valkey_version']}" if "valkey_version" in info
                         else f"redis {info.get('redis_version', '?')}")

        def phase(name, fn, n):
            m0, c0, w0 = _mem(r), _server_cpu(r), time.perf_counter()
            fn()
            wall, cpu, m1 = time.perf_counter() - w0, _server_cpu(r) - c0, _mem(r)
            res[name] = {"client_entries_per_s": round(n / wall), "server_cpu_us_per_entry": round(1e6 * cpu / n, 1),
                         "server_cpu_entries_per_s": round(n / cpu) if cpu > 0 else None,
                         "used_memory_delta_per_entry": round((m1 - m0) / n)}

        # baseline: raw XADD of the same bytes (pipelined 16 per round trip), read, ack+delete
        raw = "cap:raw"
        r.xgroup_create(raw, "g", id="0", mkstream=True)

        def raw_add():
            for i in range(0, entries, 16):
                pipe = r.pipeline(transaction=False)
                for j in range(i, min(i + 16, entries)):
                    pipe.xadd(raw, encoded[j % distinct])
                pipe.execute()

        def raw_read_ack():
            done = 0
            while done < entries:
                got = r.xreadgroup("g", "c", {raw: ">"}, count=16, block=100)
                ids = [eid for _, items in got or [] for eid, _ in items]
                pipe = r.pipeline(transaction=True)
                pipe.xack(raw, "g", *ids)
                pipe.xdel(raw, *ids)
                pipe.execute()
                done += len(ids)

        phase("baseline_raw_xadd", raw_add, entries)
        phase("baseline_raw_xreadgroup_xack_xdel", raw_read_ack, entries)
        r.delete(raw)

        # the project's path: Producer (its add within its credit) and Consumer (read, ack with accounting)
        keys = Keys("cap")
        register_workers(r, keys, ["cap-w"])
        ensure_group(r, keys, "cap-w")
        r.set(keys.epoch, "cap")
        consumer = Consumer(r, keys, "cap-l", max_plies=max_plies, window=entries + 1, block_ms=100, count=16,
                            check_legal=False)
        consumer.epoch = "cap"
        producer = Producer(r, keys, "cap-w", backoff_max_s=0.01)

        def produce():
            for i in range(entries):
                producer.send(batches[i % distinct])

        def consume():
            done = 0
            while done < entries:
                got = consumer.read()
                consumer.ack(got, sum(d.batch.num_positions for d in got), 0)
                done += len(got)

        phase("producer_lua_xadd", produce, entries)
        phase("consumer_xreadgroup_xack_xdel", consume, entries)
        acc = read_accounting(r, keys)

        # weights: every worker GETs the new blob once per version (quickstart float32: ~318 kB)
        blob = os.urandom(weights_bytes)
        r.set("cap:blob", blob)
        gets = max(50, entries // 5)

        def get_blob():
            for _ in range(gets):
                r.get("cap:blob")

        phase("weights_blob_get", get_blob, gets)
        res["weights_blob_get"]["blob_bytes"] = weights_bytes
        res["accounting_balanced"] = (acc["produced_positions"] == acc["trained_positions"]
                                      and r.xlen(keys.experience("cap-w")) == 0)
        r.close()

    add = res["producer_lua_xadd"]
    rd = res["consumer_xreadgroup_xack_xdel"]
    per_entry_us = add["server_cpu_us_per_entry"] + rd["server_cpu_us_per_entry"]
    eps = 1e6 / per_entry_us if per_entry_us > 0 else None
    res["one_server_estimate"] = {
        "entries_per_s": round(eps) if eps else None,
        "positions_per_s": round(eps * pos_per_entry) if eps else None,
        "mb_per_s_in": round(eps * wire_per_entry / 1e6, 1) if eps else None,
        "memory_bytes_per_unacked_position": round(add["used_memory_delta_per_entry"] / pos_per_entry, 1),
        "weights_get_mb_per_s": round(1e6 / res["weights_blob_get"]["server_cpu_us_per_entry"] * weights_bytes / 1e6, 1)
        if res["weights_blob_get"]["server_cpu_us_per_entry"] > 0 else None,
        "note": "1 / (server main-thread CPU per entry of the producer's add + read + ack); no network; weights GETs "
                "share the same thread (weights_get_mb_per_s: that thread doing nothing else)",
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8,16", help="comma-separated worker counts ('' skips part 1)")
    ap.add_argument("--games", type=int, default=8, help="games per worker")
    ap.add_argument("--learners", default="1", help="comma-separated learner rank counts (torchrun, gloo on CPU)")
    ap.add_argument("--seconds", type=float, default=45.0, help="measurement window per point")
    ap.add_argument("--exact-duration", action="store_true",
                    help="pass --duration SECONDS to keisei run (counted from its start) instead of stopping "
                         "SECONDS after every worker plays")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for every run")
    ap.add_argument("--warmup-timeout", type=float, default=120.0, help="seconds to wait for every worker to play")
    ap.add_argument("--capacity-entries", type=int, default=1000, help="entries of part 2 (0 skips it)")
    ap.add_argument("--batch-positions", type=int, default=1024)
    ap.add_argument("--max-plies", type=int, default=512)
    ap.add_argument("--weights-bytes", type=int, default=318_340, help="blob size of the weights GET phase")
    ap.add_argument("--keep", default=None, help="keep run directories and logs here (default: a temp dir)")
    args = ap.parse_args()

    out: dict = {"benchmark": "scale", "cpu_count": os.cpu_count(), "config": args.config,
                 "games_per_worker": args.games, "seconds": args.seconds, "exact_duration": args.exact_duration}
    with tempfile.TemporaryDirectory(prefix="ksc-") as tmpd:
        base = Path(args.keep).resolve() if args.keep else Path(tmpd)
        base.mkdir(parents=True, exist_ok=True)
        points = []
        for n_learners in [int(x) for x in args.learners.split(",") if x.strip()]:
            for w in [int(x) for x in args.workers.split(",") if x.strip()]:
                pt = run_point(w, args.games, args.seconds, args.config, args.sets, base, args.exact_duration,
                               args.warmup_timeout, base, learners=n_learners)
                pt["learners"] = n_learners
                points.append(pt)
                print(json.dumps(pt), file=sys.stderr, flush=True)
        for pt in points:  # the baseline: W = 1 (or the fewest workers) with as many learner ranks
            same = [q for q in points if q["learners"] == pt["learners"]]
            w1 = next((q for q in same if q["workers"] == 1), same[0])
            b = w1["produced_positions_per_s"]
            pt["speedup_vs_w1"] = round(pt["produced_positions_per_s"] / b, 2) if b else None
        out["points"] = points
        if args.capacity_entries > 0:
            out["redis_capacity"] = capacity(args.capacity_entries, args.batch_positions, args.max_plies, Path(tmpd),
                                            args.weights_bytes)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
