"""Transport benchmark: positions/s through a real Redis (private server on a unix socket).

Pipeline per batch, one client thread: encode -> the producer's add (credit check: XLEN + HGET;
WATCH the worker's record, XREVRANGE it, MULTI XADD entry + XADD record EXEC) -> XREADGROUP ->
decode_entry (with the consumer's game book) -> XACK + XDEL + HINCRBY (one script). Variants:
full validation (cshogi replay), structural validation only, and full validation plus the
training-input rebuild (obs + mask). Baseline in the same run: raw XADD / XREADGROUP / XACK+XDEL of
the same pre-encoded bytes, no encode/decode. ``per_core`` divides by this process's CPU time (the
server runs in its own process); ``wall`` is end-to-end. The same JSON keys as before the
per-worker streams (issue 23), so two checkouts' outputs compare key by key.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


from keisei_stream.shogi import encode_positions
from keisei_stream.wire import codec
from keisei_stream.wire.consumer import Consumer, ensure_group
from keisei_stream.ops.embedded_redis import start_redis
from keisei_stream.wire.client import connect
from keisei_stream.wire.keys import Keys
from keisei_stream.wire.producer import Producer
from keisei_stream.wire.status import read_accounting, register_workers

from batches import benchmark_batches  # noqa: E402 - this script's folder is on sys.path


def run_pipeline(r, keys, batches, rounds, max_plies, check_legal, inputs):
    register_workers(r, keys, ["bench-w"])
    producer = Producer(r, keys, "bench-w", backoff_max_s=0.01)
    consumer = Consumer(r, keys, "bench-l", max_plies=max_plies, window=64, block_ms=100, count=16,
                        check_legal=check_legal)
    positions = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for b in batches:
            producer.send(b)
        got = []
        while len(got) < len(batches):
            got += consumer.read()
        for d in got:
            if inputs:
                encode_positions(d.batch.hcp, d.batch.ply, d.batch.repetition, max_plies)
            positions += d.batch.num_positions
        consumer.ack(got, sum(d.batch.num_positions for d in got), 0)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    acc = read_accounting(r, keys)
    assert acc["trained_positions"] == acc["produced_positions"] == positions
    return positions, wall, cpu


def run_baseline(r, keys, encoded, positions_per_round, rounds):
    ensure_group(r, keys, "raw")
    stream = keys.experience("raw")
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for f in encoded:
            r.xadd(stream, f)
        got = []
        while len(got) < len(encoded):
            resp = r.xreadgroup(keys.group, "raw", {stream: ">"}, count=16, block=100)
            for _stream, items in resp or []:
                got += items
        ids = [i for i, _ in got]
        pipe = r.pipeline(transaction=True)
        pipe.xack(stream, keys.group, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
    return positions_per_round * rounds, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=8, help="batches per round")
    ap.add_argument("--positions", type=int, default=1024, help="positions per batch (whole games, at least)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-plies", type=int, default=256)
    args = ap.parse_args()

    batches = benchmark_batches(args.batches, args.positions, max_plies=args.max_plies, num_games=4)
    per_round = sum(b.num_positions for b in batches)
    encoded = [codec.encode_batch(b) for b in batches]

    results = {}
    with tempfile.TemporaryDirectory() as tmp, start_redis(tmp, maxmemory="1gb") as server:
        r = connect(server.url)
        variants = [("checked", True, False), ("unchecked", False, False), ("checked_plus_inputs", True, True)]
        for i, (name, check, inputs) in enumerate(variants):
            r.flushall()
            run_pipeline(r, Keys(f"warm{i}"), batches[:2], 1, args.max_plies, check, inputs)
            r.flushall()
            pos, wall, cpu = run_pipeline(r, Keys(f"b{i}"), batches, args.rounds, args.max_plies, check, inputs)
            results[name] = {"positions": pos, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                             "positions_per_s_wall": round(pos / wall), "positions_per_s_per_core": round(pos / cpu)}
        r.flushall()
        pos, wall, cpu = run_baseline(r, Keys("raw"), encoded, per_round, args.rounds)
        results["baseline_raw_stream"] = {"positions": pos, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                                          "positions_per_s_wall": round(pos / wall),
                                          "positions_per_s_per_core": round(pos / cpu)}
        info = r.info("server")
    out = {
        "benchmark": "transport",
        "server": (f"valkey {info['valkey_version']}" if "valkey_version" in info else f"redis {info.get('redis_version', '?')}"),
        "socket": "unix",
        "batch_positions_mean": round(per_round / len(batches), 1),
        "bytes_per_position_wire": round(sum(codec.wire_bytes(f) for f in encoded) / per_round, 2),
        "results": results,
        "goal_positions_per_s_per_core": 100_000,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
