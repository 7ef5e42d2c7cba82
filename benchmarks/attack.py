"""Attacks with one worker's own credential on a running ``keisei run``, and one JSON line saying
whether the run kept training, the honest worker kept producing, its accounting balances and the
server never answered BUSY.

    python benchmarks/attack.py [--config configs/tiny.yaml] [--workers 2] [--attacks all] [--together]
                                [--gap 10] [--tail 30] [--check]

It starts ``keisei run --config CONFIG --workers N`` in a temporary directory (private Redis with
the run's users, the learner, workers ``w0`` .. ``w{N-1}``), waits for version 2, then makes the
attacks of issue 23 as worker ``w1``, with w1's user and password from
``runs/RUN/redis-users.json`` (the run's own ACL rules), one at a time ``--gap`` seconds apart (or
all at once with ``--together``), while worker ``w0`` plays on honestly (``w1``'s own process
plays on too: it shares the credential):

- ``maxlen_own``: ``XADD experience:w1 MAXLEN 0 * d x`` (trims w1's own unread entries);
- ``maxlen_other``: the same on ``experience:w0`` (must be refused);
- ``xadd_other``: ``XADD experience:w0 * d x`` (must be refused);
- ``huge_id``: ``XADD experience:w1 18446744073709551615-18446744073709551615 d x`` (exhausts w1's
  own stream's ids; the learner resets it once read empty);
- ``huge_id_games``: the same on w1's own game stream;
- ``eval_loop``: ``EVAL "while true do end" 0`` (must be refused: no scripting for workers);
- ``eval_big``: a script building a 200 MB string (must be refused);
- ``garbage``: 20 entries of random fields on its own stream (dead-lettered);
- ``big_request``: one 4 MiB ``XADD`` on its own stream (above the private server's
  ``proto-max-bulk-len``: refused, the connection closed);
- ``overrun``: 40 valid entries at once on its own stream, ignoring its credit (read no faster
  than its credit allows, counted as overruns).

A prober (the run's monitor user) PINGs every 50 ms and counts every ``BUSY`` answer. At the end
it stops the run (SIGINT: workers, the learner's drain, the final status) and prints:
``attacks`` (each attack's outcome: ``refused`` with the server's error, or ``confined`` to w1's own
keys, with its time), ``versions`` (at the first attack, at the last, at the end),
``honest_produced`` (w0's produced positions at the same times), ``honest_balance`` (w0's
produced - trained - stale - rejected - duplicate - in its stream at the end: must be 0),
``attacker`` (w1's accounting and confinement counters), ``busy_answers`` (must be 0),
``ok``; with ``--check`` the exit code is 1 unless ``ok``. ``benchmarks/chaos.py`` makes the same
attacks (:func:`attack`) among its faults.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from keisei_stream.cli.common import url_file  # noqa: E402
from keisei_stream.cli.status import FINAL_STATUS  # noqa: E402
from keisei_stream.ops import acl  # noqa: E402
from keisei_stream.ops.local import USERS_FILE  # noqa: E402
from keisei_stream.wire.client import connect  # noqa: E402
from keisei_stream.wire.codec import encode_batch  # noqa: E402
from keisei_stream.wire.keys import Keys  # noqa: E402
from keisei_stream.wire.retry import is_busy  # noqa: E402

LARGEST_ID = "18446744073709551615-18446744073709551615"
#: Attacks that must be refused by the server; the others must stay on the attacker's own keys.
MUST_BE_REFUSED = frozenset({"maxlen_other", "xadd_other", "eval_loop", "eval_big", "big_request"})
ATTACKS = ("maxlen_own", "maxlen_other", "xadd_other", "huge_id", "huge_id_games", "eval_loop", "eval_big",
           "garbage", "big_request", "overrun")


def attacker_url(run_dir: Path, url: str, run_id: str, worker: str = "w1") -> str:
    """``url`` as ``worker``'s own user, with the password ``keisei run`` wrote in ``redis-users.json``."""
    user = acl.username(run_id, acl.worker_role(worker))
    return acl.user_url(url, user, json.loads((run_dir / USERS_FILE).read_text())[user])


def attack(name: str, url: str, keys: Keys, own: str = "w1", victim: str = "w0", seed: int = 0) -> dict:
    """Make attack ``name`` (:data:`ATTACKS`) with the credential in ``url`` (worker ``own``'s).

    Returns:
        ``{"attack", "outcome": "refused" | "confined", "error" (the server's answer, when refused),
        "time"}``; ``outcome`` is ``refused`` when the server (or the connection) refused it.
    """
    r = connect(url, retry=None, socket_timeout=10)
    out = {"attack": name, "time": round(time.time(), 3)}
    try:
        if name == "maxlen_own":
            r.xadd(keys.experience(own), {"d": "x"}, maxlen=0, approximate=False)
        elif name == "maxlen_other":
            r.xadd(keys.experience(victim), {"d": "x"}, maxlen=0, approximate=False)
        elif name == "xadd_other":
            r.xadd(keys.experience(victim), {"d": "x"})
        elif name == "huge_id":
            r.xadd(keys.experience(own), {"d": "x"}, id=LARGEST_ID)
        elif name == "huge_id_games":
            r.xadd(keys.worker_games(own), {"moves": "x"}, id=LARGEST_ID)
        elif name == "eval_loop":
            r.eval("while true do end", 0)
        elif name == "eval_big":
            r.eval("local s = string.rep('x', 200 * 1024 * 1024) return #s", 0)
        elif name == "garbage":
            rng = __import__("random").Random(seed)
            for _ in range(20):
                r.xadd(keys.experience(own), {rng.choice("dwvns"): os.urandom(rng.randint(1, 300)) for _ in range(5)})
        elif name == "big_request":
            r.xadd(keys.experience(own), {"d": os.urandom(4 << 20), "w": own, "v": "1", "n": "1", "s": "3"})
        elif name == "overrun":
            from keisei_stream.rl.selfplay import random_policy_batch
            pipe = r.pipeline(transaction=False)
            for i in range(40):
                b = random_policy_batch(64, max_plies=64, games=4, seed=seed * 100 + i, worker_id=own,
                                        batch_id=f"{own}:attacker{seed}:{i}")
                pipe.xadd(keys.experience(own), encode_batch(b))
            pipe.execute()
        else:
            raise ValueError(f"unknown attack {name!r}")
        out["outcome"] = "confined"
    except (redis.ResponseError, redis.ConnectionError, OSError) as exc:
        out.update(outcome="refused", error=f"{type(exc).__name__}: {str(exc)[:120]}")
    finally:
        r.close()
    return out


def start_run(runs: Path, run_id: str, *options: str) -> tuple[subprocess.Popen, Any, str]:
    """``keisei run --run RUN_ID --no-live ... OPTIONS`` with ``run.dir`` = ``runs`` (its output in
    ``runs/keisei-run.out``), in a session of its own; returns ``(process, output file, admin URL)``
    once it has written ``redis.url``.

    Raises:
        RuntimeError: it exited or wrote no URL within 120 s.
    """
    cmd = [sys.executable, "-m", "keisei_stream.cli", "run", "--run", run_id, "--no-live", "--print-every", "30",
           *options, "--set", f"run.dir={runs}"]
    out = open(runs / "keisei-run.out", "ab")  # noqa: SIM115 - the caller closes it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    path = url_file(runs / run_id)
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"keisei run did not start: see {runs / 'keisei-run.out'}")
        time.sleep(0.2)
    return proc, out, path.read_text().strip()


class Run:
    """A ``keisei run`` under attack: its process, Redis clients and samples."""

    def __init__(self, args: argparse.Namespace, runs: Path):
        self.args, self.runs, self.run_id = args, runs, "attack"
        self.keys = Keys(self.run_id)
        self.busy = 0
        self.probes = 0
        self.samples: list[tuple[float, int, int]] = []  # (time, version, w0's produced positions)
        self.stop_probe = threading.Event()

    def start(self) -> None:
        self.proc, self.out, self.url = start_run(self.runs, self.run_id, "--config", str(self.args.config),
                                                  "--workers", str(self.args.workers))
        self.r = connect(self.url)
        monitor = acl.username(self.run_id, "monitor")
        self.monitor_url = acl.user_url(self.url, monitor,
                                        json.loads((self.runs / self.run_id / USERS_FILE).read_text())[monitor])
        threading.Thread(target=self.probe, daemon=True).start()
        threading.Thread(target=self.sample, daemon=True).start()
        deadline = time.monotonic() + 300
        while self.version() < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("no version 2")
            time.sleep(0.5)

    def version(self) -> int:
        v = self.r.hget(self.keys.weights_latest, "version")
        return int(v) if v is not None else 0

    def honest_produced(self) -> int:
        last = self.r.xrevrange(self.keys.producer("w0"), count=1)
        return int(last[0][1].get(b"positions", 0)) if last else 0

    def probe(self) -> None:
        """PING as the monitor every 50 ms; count BUSY answers (no retries: every answer counts)."""
        r = connect(self.monitor_url, retry=None, socket_timeout=5)
        while not self.stop_probe.is_set():
            try:
                r.ping()
                r.get(self.keys.control)
            except redis.ResponseError as exc:
                self.busy += is_busy(exc)
            except (redis.ConnectionError, OSError):
                pass
            self.probes += 1
            self.stop_probe.wait(0.05)

    def sample(self) -> None:
        r = connect(self.url)
        while not self.stop_probe.is_set():
            try:
                v = int(r.hget(self.keys.weights_latest, "version") or 0)
                last = r.xrevrange(self.keys.producer("w0"), count=1)
                self.samples.append((time.time(), v, int(last[0][1].get(b"positions", 0)) if last else 0))
            except redis.RedisError:
                pass
            self.stop_probe.wait(1.0)

    def at(self, t: float) -> tuple[int, int]:
        """(version, w0's produced positions) at the last sample before unix time ``t``."""
        before = [(v, p) for s, v, p in self.samples if s <= t]
        return before[-1] if before else (0, 0)

    def stop(self) -> tuple[dict, int]:
        self.stop_probe.set()
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(600)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self.out.close()
        return json.loads((self.runs / self.run_id / FINAL_STATUS).read_text()), rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--attacks", default="all", help="comma-separated names of ATTACKS, or all")
    p.add_argument("--together", action="store_true", help="all attacks at once instead of --gap apart")
    p.add_argument("--gap", type=float, default=10.0, help="seconds between two attacks")
    p.add_argument("--tail", type=float, default=30.0, help="seconds the run goes on after the last attack")
    p.add_argument("--runs-dir", type=Path, default=None)
    p.add_argument("--check", action="store_true", help="exit 1 unless ok")
    args = p.parse_args(argv)
    names = ATTACKS if args.attacks == "all" else tuple(x for x in args.attacks.split(",") if x)
    if args.workers < 2:
        p.error("--workers must be >= 2 (w0 honest, w1 attacked)")
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="keisei-attack-"))
    runs.mkdir(parents=True, exist_ok=True)
    run = Run(args, runs)
    t0 = time.monotonic()
    try:
        run.start()
        att_url = attacker_url(runs / run.run_id, run.url, run.run_id)
        done = []
        first = time.time()
        if args.together:
            threads = [threading.Thread(target=lambda n=n, i=i: done.append(attack(n, att_url, run.keys, seed=i)))
                       for i, n in enumerate(names)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        else:
            for i, n in enumerate(names):
                done.append(attack(n, att_url, run.keys, seed=i))
                print(json.dumps(done[-1]), file=sys.stderr, flush=True)
                time.sleep(args.gap)
        last = time.time()
        time.sleep(args.tail)
        end = time.time()
        final, rc = run.stop()
    except BaseException:
        if getattr(run, "proc", None) is not None and run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
        raise
    pw = final.get("per_worker", {})
    w0, w1 = pw.get("w0", {}), pw.get("w1", {})
    settled = sum(w0.get(f"{k}_positions", 0) for k in ("trained", "stale", "rejected", "duplicate"))
    balance = w0.get("produced_positions", 0) - settled - w0.get("in_stream_positions", 0)
    (v_first, p_first), (v_last, p_last), (v_end, p_end) = run.at(first), run.at(last), run.at(end)
    misplaced = [a for a in done if a["attack"] in MUST_BE_REFUSED and a["outcome"] != "refused"]
    out = {"benchmark": "attack", "config": str(args.config), "workers": args.workers, "together": args.together,
           "attacks": done, "versions": {"first_attack": v_first, "last_attack": v_last, "end": v_end},
           "honest_produced": {"first_attack": p_first, "last_attack": p_last, "end": p_end},
           "honest_balance": balance, "honest": {k: w0.get(k) for k in (
               "produced_positions", "trained_positions", "stale_positions", "rejected_positions",
               "duplicate_positions", "in_stream_positions")},
           "attacker": w1, "busy_answers": run.busy, "probes": run.probes, "keisei_run_exit": rc,
           "rejected_honest": w0.get("rejected_positions", 0), "wall_s": round(time.monotonic() - t0, 1),
           "runs_dir": str(runs)}
    out["ok"] = bool(not misplaced and balance == 0 and run.busy == 0 and rc == 0 and v_end > v_last >= v_first
                     and p_end > p_last and w0.get("rejected_positions", 0) == 0 and w0.get("produced_positions", 0) > 0)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
