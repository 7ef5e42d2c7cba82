"""Cost of the private Redis's persistence: experience entries added per second under each AOF
fsync policy, against the same server without persistence (the baseline, measured in the same run).

Each round starts a private server (unix socket) per policy, adds ``--entries`` stream entries of
``--entry-bytes`` incompressible bytes one XADD at a time (as workers do), then acknowledges and
deletes them (XACK + XDEL in MULTI/EXEC, as the learner does). Policies alternate within a round
and rounds repeat, so a drift of the machine touches every policy alike; medians are printed.

Prints one JSON object: per policy, entries/s and MB/s of the add phase and entries/s of the
ack phase, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from keisei_stream.ops.embedded_redis import start_redis
from keisei_stream.wire.client import connect

POLICIES = ("off", "no", "everysec", "always")  # off = appendonly no (baseline)


def one_run(policy: str, entries: int, entry_bytes: int) -> tuple[float, float]:
    """(add entries/s, ack entries/s) of one fresh server with ``policy``."""
    with tempfile.TemporaryDirectory(prefix="keisei-aof-") as d:
        kw = {} if policy == "off" else {"appendonly": True, "appendfsync": policy}
        server = start_redis(d, maxmemory="2gb", **kw)
        try:
            r = connect(server.url)
            r.xgroup_create("exp", "learners", id="0", mkstream=True)
            payload = os.urandom(entry_bytes)
            t0 = time.perf_counter()
            for i in range(entries):
                r.xadd("exp", {"d": payload, "w": "w0", "v": 1, "n": 1024, "s": 1})
            add_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            while True:
                got = r.xreadgroup("learners", "l0", {"exp": ">"}, count=16)
                if not got:
                    break
                ids = [eid for _, items in got for eid, _ in items]
                pipe = r.pipeline(transaction=True)
                pipe.xack("exp", "learners", *ids)
                pipe.xdel("exp", *ids)
                pipe.execute()
            ack_s = time.perf_counter() - t0
            r.close()
            return entries / add_s, entries / ack_s
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=2000)
    p.add_argument("--entry-bytes", type=int, default=25_000, help="about one 1024-position batch")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in POLICIES}
    for _ in range(args.rounds):
        for policy in POLICIES:
            results[policy].append(one_run(policy, args.entries, args.entry_bytes))
    base_add = statistics.median(a for a, _ in results["off"])
    out = {"entries": args.entries, "entry_bytes": args.entry_bytes, "rounds": args.rounds, "policies": {}}
    for policy, runs in results.items():
        add = statistics.median(a for a, _ in runs)
        ack = statistics.median(b for _, b in runs)
        out["policies"][policy] = {"add_entries_per_s": round(add, 1),
                                   "add_mb_per_s": round(add * args.entry_bytes / 1e6, 1),
                                   "ack_entries_per_s": round(ack, 1),
                                   "add_vs_baseline": round(add / base_add, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
