"""The benchmark-only processes of ``benchmarks/fleet.py`` (one role per invocation, each run
inside one of the fleet's network namespaces; none of this is part of the library):

* ``learner``: the stand-in for a GPU learner. It writes the run's config (``configs/gpu.yaml``'s
  net, so real workers can load what it publishes), claims the run's epoch, publishes the gpu
  net's weights in bfloat16 (6.33 MB, 3,164,195 parameters; :func:`publish_weights`) every
  ``--version-every`` seconds, reads every roster worker's experience stream through the
  project's :class:`~keisei_stream.wire.consumer.Consumer` (one ``XREADGROUP`` over the roster,
  the credit it publishes, entries decoded and validated) and acknowledges each entry as trained
  at once, and writes the ``learner`` status through the learner's own
  :class:`~learner.report.Report` (its accounting read: one pipelined round trip over the
  workers' records). After an outage it does what the learner does (the consumer's one outage
  check; a lost run recovered, a failover's lacks recorded and a lacking version published
  again). Each publication's version and unix time go to ``--out`` (JSON lines).
* ``synthetic``: one host's synthetic workers, one thread each, behaving towards Redis as a worker
  does: its own ACL user and connection on the primary (writes, the epoch and its credit), the
  host's read-only copy for config, ``control`` and weights (one connection and one subscription
  each), each version fetched and its SHA-256 verified (:func:`read_latest_weights`), ``control``
  obeyed (read every :data:`CONTROL_S`), experience sent through the project's
  :class:`~keisei_stream.wire.producer.Producer` within the credit the learner publishes, at a set
  rate from recorded self-play batches (:func:`batches.benchmark_batches`, re-stamped with the
  version held), a heartbeat every ``stream.heartbeat_s``, after an outage the worker's check (its
  :class:`~keisei_stream.wire.atomic.EpochWatch`: with the epoch intact, the producer counts the
  adds a failover lost). No model, no games: almost no CPU between versions. At the end one JSON
  line per worker goes to ``--out``: the versions it held with the unix time it held each, the
  positions and batches the primary acknowledged, the positions it found lost, and the time its
  fetches took (wall, and this thread's CPU: the client's receive and the SHA-256).

Bounded: every loop ends at ``--deadline`` (unix seconds) at the latest.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from keisei_stream.config import config_from_json, load_config  # noqa: E402
from keisei_stream.wire import retry  # noqa: E402
from keisei_stream.wire.atomic import EpochWatch  # noqa: E402
from keisei_stream.wire.client import as_str, connect  # noqa: E402
from keisei_stream.wire.keys import Keys  # noqa: E402
from keisei_stream.wire.producer import Producer  # noqa: E402
from keisei_stream.wire.status import CONTROL_S, get_control, write_config, write_worker_heartbeat  # noqa: E402
from keisei_stream.wire.weights import WeightsError, WeightsWatcher, publish_weights, read_latest_weights  # noqa: E402

log = logging.getLogger("keisei.fleet")


def fleet_config(run: str, run_dir: str, batch_positions: int, wait_replicas: int):
    """The fleet's run config: ``configs/gpu.yaml`` (its net: what the real workers build and the
    stand-in publishes) on the CPU, with small batches so that a short run settles some (and
    ``ppo.samples_per_update`` within the window they allow: the stand-in trains nothing)."""
    return load_config(ROOT / "configs" / "gpu.yaml", [
        f"run.id={run}", f"run.dir={run_dir}", "model.compile=false", "worker.device=cpu", "learner.device=cpu",
        f"stream.batch_positions={batch_positions}", "learner.tensorboard=false", f"stream.wait_replicas={wait_replicas}",
        "ppo.samples_per_update=8192"])


# ---------------------------------------------------------------------------------------- learner
def run_learner(args: argparse.Namespace) -> int:
    import torch

    from keisei_stream.rl.checkpoint import weights_to_bytes
    from keisei_stream.rl.model import build_model, count_parameters
    from keisei_stream.wire.consumer import Consumer
    from learner.report import MetricsSinks, Report

    stop = retry.StopFlag()
    cfg = fleet_config(args.run, args.run_dir, args.batch_positions, args.wait_replicas)
    keys, r = Keys(args.run), connect(args.redis)
    wait = (cfg.stream.wait_replicas, cfg.stream.wait_ms) if cfg.stream.wait_replicas else None
    consumer = Consumer(r, keys, "learner-0", max_plies=cfg.env.max_plies, window=cfg.stream.max_backlog, block_ms=100,
                        count=cfg.stream.read_count, claim_idle_ms=cfg.stream.claim_idle_ms,
                        deadletter_maxlen=cfg.stream.deadletter_maxlen, refresh_s=cfg.stream.learner_refresh_s,
                        publishes=True, wait=wait)
    consumer.claim_epoch()
    write_config(r, keys, cfg.to_json())
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    report = Report(cfg, r, keys, MetricsSinks(cfg, r, keys, Path(args.run_dir), quiet=True), primary=True)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    bias = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    out = open(args.out, "a", buffering=1)
    out.write(json.dumps({"parameters": count_parameters(model)}) + "\n")
    version, next_publish, trained = 0, 0.0, 0

    def publish() -> None:
        with torch.no_grad():
            bias.add_(1e-3)  # a new version: new bytes, new sha256, same net
        data = weights_to_bytes(model, "bfloat16")
        t = time.time()
        publish_weights(r, keys, version, data, "bfloat16", cfg.stream.weights_keep, epoch=consumer.epoch, wait=wait)
        consumer.published(version)
        out.write(json.dumps({"version": version, "published": t, "bytes": len(data),
                              "publish_s": round(time.time() - t, 4)}) + "\n")

    def status(state: str, final: bool = False) -> None:
        report.status({"state": state, "version": version, "consumer": consumer.name, "epoch": consumer.epoch,
                       "held_positions": 0, "backlog": consumer.backlog_seen, "workers_read": len(consumer.workers),
                       "workers_live": len(consumer.live)}, wait=final)

    try:
        while not stop.requested and time.time() < args.deadline:
            if time.monotonic() >= next_publish:
                version += 1
                publish()
                next_publish = time.monotonic() + args.version_every
            consumer.receive(block_ms=50)
            trained += settle_all(consumer)
            if consumer.check_server():  # what the learner does after an outage (Learner.check_server)
                consumer.recover(report.last_accounting, version=version)
                publish()
            elif consumer.outage_checked and consumer.record_failover(report.last_accounting, version) < version:
                publish()
            if report.status_due():
                status("training")
        drain_until = time.monotonic() + args.drain_s  # after the workers stopped: what is left in the streams
        while time.monotonic() < drain_until and time.time() < args.deadline + args.drain_s:
            if not consumer.receive(block_ms=200) and not consumer.held and consumer.backlog() == 0:
                break
            trained += settle_all(consumer)
        status("stopped", final=True)
    except retry.TRANSIENT_ERRORS as exc:
        log.error("stopped during an outage: %s", exc)
    finally:
        report.close()
        out.write(json.dumps({"stopped": time.time(), "trained_positions": trained, "versions": version,
                              **{f"consumer_{k}": v for k, v in consumer.stats.items()}}) + "\n")
        out.close()
    return 0


def settle_all(consumer) -> int:
    """Acknowledge every held entry as trained (the stand-in trains nothing); returns the positions."""
    flat = [d for group in consumer.take_updates(1, force=True) for d in group]
    if flat:
        consumer.settle(flat, [d.batch.num_positions for d in flat])
    return sum(d.batch.num_positions for d in flat)


# ---------------------------------------------------------------------------------------- synthetic
class SyntheticWorker(threading.Thread):
    """One synthetic worker (see the module doc); ``held`` lists ``(version, unix time held)``."""

    def __init__(self, wid: str, write_url: str, read_url: str, keys: Keys, templates: list, period_s: float,
                 deadline: float, stop: retry.StopFlag):
        super().__init__(name=wid, daemon=True)
        self.wid, self.write_url, self.read_url, self.keys = wid, write_url, read_url, keys
        self.templates, self.period_s, self.deadline, self.stop = templates, period_s, deadline, stop
        self.held: list[tuple[int, float]] = []
        self.sent_positions = self.sent_batches = self.refused = self.lost_positions = self.lost_batches = 0
        self.fetch_wall_s: list[float] = []
        self.fetch_cpu_s: list[float] = []
        self.error = ""
        self.control = "run"

    def stopping(self) -> bool:
        return self.stop.requested or self.control == "stop" or time.time() > self.deadline

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported in the output line, counted by fleet.py
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("synthetic worker %s failed", self.wid)

    def _run(self) -> None:
        w, rd = connect(self.write_url), connect(self.read_url)
        raw = None
        while raw is None and not self.stopping():
            raw = rd.get(self.keys.config)
            if raw is None:
                time.sleep(0.5)
        if raw is None:
            return
        cfg = config_from_json(raw)
        epoch = w.get(self.keys.epoch)
        watch = EpochWatch(None if epoch is None else as_str(epoch))
        producer = Producer(w, self.keys, self.wid, cfg.stream.backoff_max_s, epoch=watch)
        watcher = WeightsWatcher(rd, self.keys, cfg.stream.weights_poll_s)
        version, now = 0, time.monotonic()
        next_send, next_control, next_beat = now + random.uniform(0, self.period_s), 0.0, now + random.uniform(0, 5)
        while True:
            now = time.monotonic()
            if now >= next_control:
                self.control, next_control = get_control(rd, self.keys), now + CONTROL_S
            if self.stopping():
                break
            if now >= next_beat:
                next_beat = now + cfg.stream.heartbeat_s
                self.heartbeat(w, cfg, version, "paused" if self.control == "pause" else "playing")
            announced = watcher.wait(max(0.0, min(next_control, next_beat, next_send) - time.monotonic()))
            if announced is not None and announced > version:
                t_wall, t_cpu = time.monotonic(), time.thread_time()
                try:
                    latest = read_latest_weights(rd, self.keys)  # SHA-256 and size verified
                except WeightsError:
                    self.refused += 1
                    latest = None
                self.fetch_wall_s.append(time.monotonic() - t_wall)
                self.fetch_cpu_s.append(time.thread_time() - t_cpu)
                if latest is not None and latest[0] > version:
                    version = latest[0]
                    self.held.append((version, time.time()))
            if watch.changed(w, self.keys):  # the worker's outage check (Worker.check_server)
                watch.epoch = watch.found
            elif watch.looked:
                producer.reconcile()
            if version >= 1 and self.control == "run" and time.monotonic() >= next_send:
                batch = copy.copy(self.templates[self.sent_batches % len(self.templates)])
                batch.version = np.full(batch.num_positions, version, np.uint32)
                if producer.send(batch, should_stop=self.stopping):
                    self.sent_positions += batch.num_positions
                    self.sent_batches += 1
                next_send += self.period_s
        producer.reconcile()
        self.lost_positions, self.lost_batches = producer.lost_positions, producer.lost_batches
        self.heartbeat(w, cfg, version, "stopped")
        watcher.close()

    def heartbeat(self, w, cfg, version: int, state: str) -> None:
        retry.best_effort("heartbeat", write_worker_heartbeat, w, self.keys, self.wid, {
            "host": socket.gethostname(), "state": state, "version": version, "positions": self.sent_positions,
            "batches": self.sent_batches, "synthetic": 1, "last_seen": round(time.time(), 3),
            **retry.OUTAGES.fields()}, cfg.stream.heartbeat_ttl_s)


def write_templates(path: Path, count: int, positions: int, max_plies: int) -> None:
    """``count`` recorded self-play batches (:func:`batches.benchmark_batches`) of ``positions``
    positions, encoded as stream entries (msgpack of the entries' fields) in ``path``: made once
    by ``fleet.py``, read by every host's process (:func:`read_templates`)."""
    import msgpack

    from batches import benchmark_batches
    from keisei_stream.wire.codec import encode_batch

    entries = [{k: v if isinstance(v, bytes) else str(v).encode() for k, v in encode_batch(b).items()}
               for b in benchmark_batches(count, positions, max_plies=max_plies, num_games=8)]
    path.write_bytes(msgpack.packb(entries, use_bin_type=True))


def read_templates(path: Path, max_plies: int) -> list:
    """The batches of :func:`write_templates`, decoded and validated like any entry."""
    import msgpack

    from keisei_stream.wire.codec import decode_entry

    return [decode_entry({k.encode(): v for k, v in e.items()}, max_plies=max_plies, check_legal=True)
            for e in msgpack.unpackb(path.read_bytes(), raw=False)]


def run_synthetic(args: argparse.Namespace) -> int:
    stop = retry.StopFlag()
    keys = Keys(args.run)
    users = json.loads(Path(args.users).read_text())  # worker id -> its write URL (mode 600 file)
    templates = read_templates(Path(args.templates), args.max_plies)
    period = max(t.num_positions for t in templates) / args.positions_per_s
    workers = [SyntheticWorker(wid, users[wid], args.read_url, keys, templates, period, args.deadline, stop)
               for wid in args.ids.split(",")]
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.0, args.deadline - time.time()) + 30)
    cpu = os.times()
    with open(args.out, "w") as out:
        out.write(json.dumps({"process_cpu_s": round(cpu.user + cpu.system, 2), "workers": len(workers)}) + "\n")
        for t in workers:
            out.write(json.dumps({"id": t.wid, "held": t.held, "sent_positions": t.sent_positions,
                                  "sent_batches": t.sent_batches, "lost_positions": t.lost_positions,
                                  "lost_batches": t.lost_batches, "refused_weights": t.refused,
                                  "fetch_wall_s": [round(x, 5) for x in t.fetch_wall_s],
                                  "fetch_cpu_s": [round(x, 5) for x in t.fetch_cpu_s], "error": t.error,
                                  "alive": t.is_alive()}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    pl = sub.add_parser("learner")
    pl.add_argument("--redis", default=os.environ.get("KEISEI_REDIS"))
    pl.add_argument("--run", required=True)
    pl.add_argument("--run-dir", required=True)
    pl.add_argument("--version-every", type=float, default=5.0)
    pl.add_argument("--batch-positions", type=int, default=256)
    pl.add_argument("--wait-replicas", type=int, default=0)
    pl.add_argument("--deadline", type=float, required=True)
    pl.add_argument("--drain-s", type=float, default=60.0)
    pl.add_argument("--out", required=True)
    ps = sub.add_parser("synthetic")
    ps.add_argument("--run", required=True)
    ps.add_argument("--ids", required=True, help="comma-separated worker ids")
    ps.add_argument("--users", required=True, help="JSON file: worker id -> its write URL")
    ps.add_argument("--read-url", default=os.environ.get("KEISEI_READ_REDIS"))
    ps.add_argument("--positions-per-s", type=float, default=10.0, help="of each worker")
    ps.add_argument("--templates", required=True, help="file of write_templates")
    ps.add_argument("--max-plies", type=int, default=512)
    ps.add_argument("--deadline", type=float, required=True)
    ps.add_argument("--out", required=True)
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: every thread's stack to the log (a stuck client)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_learner(args) if args.role == "learner" else run_synthetic(args)


if __name__ == "__main__":
    sys.exit(main())
