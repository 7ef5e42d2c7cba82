"""A chaos run: a local ``keisei run`` under a seeded random schedule of faults, then a clean stop
and one JSON line saying whether anything was lost.

    python benchmarks/chaos.py --minutes 4 --seed 1 [--config configs/tiny.yaml] [--workers 2] [--check]

It starts ``keisei run`` (private persistent Redis with its users, the learner, ``--workers``
workers, all supervised: crashed processes and a killed Redis are restarted by ``keisei run``
itself) and, from the moment version 2 is published until about 30 s before the end, injects
faults at random times (gaps uniform in ``--gap`` seconds) drawn from:

- ``kill_worker``: kill -9 of a random worker (``keisei run`` restarts it with backoff);
- ``kill_learner``: kill -9 of the learner (restarted with ``--resume``: its checkpoint, its
  pending entries);
- ``redis_stop``: SIGSTOP of the Redis server for 2-30 s, then SIGCONT;
- ``redis_kill``: kill -9 of the Redis server (``keisei run`` starts it again from its
  append-only file and creates the users again);
- ``redis_full``: ``CONFIG SET maxmemory`` just above the memory in use for 5-20 s (every write
  that needs memory is refused: backpressure), then the configured limit again;
- ``hostile``: 1-5 entries the learner must reject (random payload, wrong schema, missing field,
  bad count, another worker's name), added straight to a worker's stream;
- ``replay``: an entry of a worker's stream added again (the learner must drop it as a duplicate);
- ``attack``: one of the attacks of ``benchmarks/attack.py`` made with worker ``w1``'s own
  credential (``--workers`` >= 2): trimming its own stream or another's, the largest id, an endless
  or memory-hungry script, garbage, a request above the server's limit, ignoring its credit.

Faults overlap: a stop or a full Redis lasts while the next faults come. At the end it waits for
the last fault to be over, stops the run (SIGINT: workers, then the learner's drain, then the
final status) and prints one JSON line: ``faults_injected``, ``faults`` (per kind), the
accounting (``produced``, ``trained``, ``stale``, ``rejected``, ``duplicate``, ``in_stream``
positions), per worker ``lost`` = produced + replayed - trained - stale - rejected - duplicate -
in its stream (``lost_positions``: the sum over the workers whose stream no attack trimmed, must
be 0; hostile entries decode to 0 positions; ``confined_lost_positions``: what ``w1``'s own
credential trimmed from its own stream), ``attacks`` (each one's outcome: refused, or confined to
w1's own keys; one that must be refused and was not fails the run), ``busy_answers`` (``BUSY``
answers to this script's own reads: must be 0), ``versions_monotonic`` (every ``weights:latest``
version sampled each second never went down), ``weights_finite`` (every parameter of the final
checkpoint), the restarts ``keisei run`` counted, and ``ok``. With ``--check`` the exit code is 1
unless ``ok``.

Measured on this project's shared 2-core machine (no GPU); see the manual's results page (docs/results.md, chaos runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from keisei_stream.cli.status import FINAL_STATUS  # noqa: E402
from keisei_stream.wire.client import connect  # noqa: E402
from keisei_stream.wire.keys import Keys  # noqa: E402
from keisei_stream.wire.retry import is_busy, is_oom  # noqa: E402
from keisei_stream.wire.status import read_roster  # noqa: E402

from attack import ATTACKS, MUST_BE_REFUSED, attack, attacker_url, start_run  # noqa: E402 - this script's folder is on sys.path

KINDS = {"kill_worker": 3, "kill_learner": 2, "redis_stop": 2, "redis_kill": 2, "redis_full": 2, "hostile": 2,
         "replay": 2, "attack": 3}
#: ``w`` of the hostile entries (the learner dead-letters them; they decode to 0 positions)
HOSTILE_WORKER = "chaos-hostile"


def pids_of(*needles: str) -> list[int]:
    """Processes whose command line holds every one of ``needles`` (``/proc/*/cmdline``)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            out.append(int(d.name))
    return out


class Chaos:
    """The run under test and the faults injected into it."""

    def __init__(self, args: argparse.Namespace, runs: Path):
        self.args, self.runs = args, runs
        self.run_id = f"chaos-{args.seed}"
        self.keys = Keys(self.run_id)
        self.rng = random.Random(args.seed)
        self.faults: Counter[str] = Counter()
        self.replayed: Counter[str] = Counter()  # worker -> positions added again to its stream
        self.hostile = 0
        self.attacks: list[dict] = []
        self.busy = 0
        self.versions: list[int] = []
        self.threads: list[threading.Thread] = []
        self.stop_sampling = threading.Event()
        self.log: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.r: redis.Redis | None = None
        self.url = ""
        self.maxmemory = 0

    def say(self, line: str) -> None:
        stamp = f"[chaos {time.monotonic() - self.t0:6.1f}s] {line}"
        self.log.append(stamp)
        print(stamp, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the run
    def start(self) -> None:
        a = self.args
        self.t0 = time.monotonic()
        self.proc, self.out, self.url = start_run(
            self.runs, self.run_id, "--config", str(a.config), "--workers", str(a.workers), "--maxmemory", a.maxmemory,
            "--restart-backoff", "0.5", "--learner-restarts", "1000", *[x for ov in a.set for x in ("--set", ov)])
        self.r = connect(self.url)
        self.maxmemory = int(self.r.config_get("maxmemory")["maxmemory"])
        threading.Thread(target=self.sample_versions, daemon=True).start()
        self.wait_for(lambda: self.version() >= 2, 300, "version 2")
        self.say(f"run {self.run_id} up: version {self.version()}")

    def version(self) -> int:
        v = self.r.hget(self.keys.weights_latest, "version")
        return int(v) if v is not None else 0

    def sample_versions(self) -> None:
        """``weights:latest`` version once a second (a client of its own: never blocks the faults)."""
        r = connect(self.url)
        while not self.stop_sampling.is_set():
            try:
                self.versions.append(int(r.hget(self.keys.weights_latest, "version") or 0))
            except redis.ResponseError as exc:
                self.busy += is_busy(exc)
            except redis.RedisError:
                pass
            self.stop_sampling.wait(1.0)

    def wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"keisei run exited ({self.proc.returncode}) waiting for {what}")
            time.sleep(0.5)

    def redis_pid(self) -> int:
        return int(self.r.info("server")["process_id"])

    # ------------------------------------------------------------------ faults
    def inject(self, kind: str) -> bool:
        """One fault of ``kind``; False when it could not be made now (nothing to kill, empty stream)."""
        if kind in ("kill_worker", "kill_learner"):
            needles = ("-m workers", f"--run {self.run_id}") if kind == "kill_worker" else \
                ("-m learner", f"run.id={self.run_id}")
            pids = pids_of(*needles)
            if not pids:
                return False
            pid = self.rng.choice(sorted(pids))
            os.kill(pid, signal.SIGKILL)
            self.say(f"{kind}: kill -9 {pid}")
            return True
        if kind == "redis_kill":
            pid = self.redis_pid()
            os.kill(pid, signal.SIGKILL)
            self.say(f"redis_kill: kill -9 {pid}")
            return True
        if kind == "redis_stop":
            seconds = self.rng.uniform(2, 30)
            pid = self.redis_pid()
            self.background(self.stop_redis, pid, seconds)
            self.say(f"redis_stop: SIGSTOP {pid} for {seconds:.1f} s")
            return True
        if kind == "redis_full":
            seconds = self.rng.uniform(5, 20)
            self.background(self.fill_redis, seconds)
            self.say(f"redis_full: maxmemory at the memory in use for {seconds:.1f} s")
            return True
        if kind == "hostile":
            n = self.rng.randint(1, 5)
            added = 0
            for _ in range(n):
                if not self.add(self.hostile_entry()):
                    break
                added += 1
            self.hostile += added
            self.say(f"hostile: {added} entries")
            return added > 0
        if kind == "replay":
            w = self.rng.choice(read_roster(self.r, self.keys))
            items = self.r.xrange(self.keys.experience(w), count=50)
            items = [(i, f) for i, f in items if f.get(b"w", b"") == w.encode() and b"n" in f]
            if not items:
                return False
            _id, fields = self.rng.choice(items)
            if not self.add(fields, w):
                return False
            self.replayed[w] += int(fields[b"n"])
            self.say(f"replay: an entry of {int(fields[b'n'])} positions added again to {w}'s stream")
            return True
        if kind == "attack":
            if self.args.workers < 2:
                return False
            name = self.rng.choice(ATTACKS)
            url = attacker_url(self.runs / self.run_id, self.url, self.run_id)
            self.attacks.append(attack(name, url, self.keys, seed=len(self.attacks)))
            self.say(f"attack by w1's credential: {name}: {self.attacks[-1]['outcome']}")
            return True
        raise ValueError(kind)

    def add(self, fields: dict, worker: str | None = None) -> bool:
        """XADD to a worker's stream (a random one of the roster when None); False when Redis is
        full (a fault of its own) and refused it."""
        try:
            self.r.xadd(self.keys.experience(worker or self.rng.choice(read_roster(self.r, self.keys))), fields)
        except redis.ResponseError as exc:
            if not is_oom(exc):
                raise
            return False
        return True

    def hostile_entry(self) -> dict:
        """An entry the learner rejects before decoding any position."""
        good = {"d": os.urandom(self.rng.randint(8, 400)), "w": HOSTILE_WORKER, "v": "1", "n": "100", "s": "1"}
        kind = self.rng.randrange(4)
        if kind == 1:
            good["s"] = "99"
        elif kind == 2:
            del good["v"]
        elif kind == 3:
            good["n"] = "abc"
        return good

    def background(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def stop_redis(self, pid: int, seconds: float) -> None:
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(seconds)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # killed meanwhile (redis_kill): keisei run started another
                pass

    def fill_redis(self, seconds: float) -> None:
        r = connect(self.url)
        try:
            used = int(r.info("memory")["used_memory"])
            r.config_set("maxmemory", used + 64 * 1024)
            time.sleep(seconds)
        finally:
            r.config_set("maxmemory", self.maxmemory)  # also right on a server restarted meanwhile

    def schedule(self) -> None:
        a = self.args
        end = self.t0 + a.minutes * 60 - a.tail
        kinds, weights = zip(*KINDS.items())
        while True:
            gap = self.rng.uniform(*a.gap)
            if time.monotonic() + gap > end:
                break
            time.sleep(gap)
            if self.proc.poll() is not None:
                raise RuntimeError(f"keisei run exited ({self.proc.returncode}) during the faults")
            kind = self.rng.choices(kinds, weights)[0]
            if self.inject(kind):
                self.faults[kind] += 1
        for t in self.threads:
            t.join()
        self.say(f"faults over ({sum(self.faults.values())}); settling {max(0.0, self.t0 + a.minutes * 60 - time.monotonic()):.0f} s")
        time.sleep(max(0.0, self.t0 + a.minutes * 60 - time.monotonic()))

    # ------------------------------------------------------------------ the end
    def stop(self) -> dict:
        self.stop_sampling.set()  # (its client would wait for the private Redis, gone after the stop)
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        final = json.loads((self.runs / self.run_id / FINAL_STATUS).read_text())
        return self.result(final, rc)

    def result(self, final: dict, rc: int) -> dict:
        acc, stream = final["accounting"], final["stream"]
        produced = int(acc["produced_positions"])
        settled = {k: int(acc[f"{k}_positions"]) for k in ("trained", "stale", "rejected", "duplicate")}
        in_stream = int(stream.get("positions", 0))
        per_worker = {w: int(d.get("produced_positions", 0)) + self.replayed[w] - int(d.get("in_stream_positions", 0))
                      - sum(int(d.get(f"{k}_positions", 0)) for k in ("trained", "stale", "rejected", "duplicate"))
                      for w, d in final.get("per_worker", {}).items()}
        # an attack that reached w1's own stream (a trim, a hand-made entry) costs w1's balance only
        touched = {"w1"} if any(a["outcome"] == "confined" for a in self.attacks) else set()
        lost = sum(v for w, v in per_worker.items() if w not in touched)
        misplaced = [a for a in self.attacks if a["attack"] in MUST_BE_REFUSED and a["outcome"] != "refused"]
        monotonic = all(b >= a for a, b in zip(self.versions, self.versions[1:]))
        finite = weights_finite(self.runs / self.run_id / "checkpoints")
        sv = final.get("supervisor") or {}
        out = {"benchmark": "chaos", "minutes": self.args.minutes, "seed": self.args.seed,
               "config": str(self.args.config), "workers": self.args.workers,
               "faults_injected": sum(self.faults.values()), "faults": dict(sorted(self.faults.items())),
               "produced": produced, **settled, "in_stream": in_stream, "in_stream_entries": int(stream.get("length", 0)),
               "replayed_positions": sum(self.replayed.values()), "hostile_entries": self.hostile,
               "rejected_entries": int(acc.get("rejected_entries", 0)), "lost_positions": lost,
               "lost_per_worker": per_worker, "confined_lost_positions": sum(per_worker[w] for w in touched
                                                                             if w in per_worker),
               "attacks": self.attacks, "busy_answers": self.busy,
               "versions_monotonic": monotonic, "final_version": self.versions[-1] if self.versions else 0,
               "weights_finite": finite, "worker_restarts": int(sv.get("worker_restarts", 0)),
               "learner_restarts": int(sv.get("learner_restarts", 0)), "redis_restarts": int(sv.get("redis_restarts", 0)),
               "keisei_run_exit": rc, "wall_s": round(time.monotonic() - self.t0, 1)}
        out["ok"] = bool(lost == 0 and monotonic and finite and rc == 0 and produced > 0 and not misplaced
                         and self.busy == 0)
        return out


def weights_finite(ckpt_dir: Path) -> bool:
    """Every floating tensor of the newest checkpoint's model is finite."""
    import torch

    from keisei_stream.rl.checkpoint import latest_checkpoint

    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return False
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = state.get("model", state)
    return all(bool(torch.isfinite(t).all()) for t in model.values() if torch.is_tensor(t) and t.is_floating_point())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--maxmemory", default="256mb", help="the private Redis's maxmemory")
    p.add_argument("--gap", type=float, nargs=2, default=(5.0, 20.0), metavar=("MIN", "MAX"),
                   help="seconds between two faults, uniform (default 5 20)")
    p.add_argument("--tail", type=float, default=30.0, help="seconds without new faults before the stop")
    p.add_argument("--runs-dir", type=Path, default=None, help="where the run goes (default: a temporary directory)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--check", action="store_true", help="exit 1 unless ok")
    args = p.parse_args(argv)
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="keisei-chaos-"))
    runs.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(args, runs)
    try:
        chaos.start()
        chaos.schedule()
        out = chaos.stop()
    except BaseException:
        if chaos.proc is not None and chaos.proc.poll() is None:
            os.killpg(chaos.proc.pid, signal.SIGKILL)
        raise
    out["runs_dir"] = str(runs)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
