"""Wire codec benchmark: bytes per position on the wire, encode / decode cost per position.

Batches are complete uniformly-random self-play games (keisei_stream.shogi.VecEnv, max_plies
256), about ``--positions`` positions each (the config's batch_positions is 1024), with
behaviour values and log-probabilities replaced by random float32 (a real network's outputs do
not compress). Timings are single-threaded (one core). Baseline measured in the same run:
plain msgpack + lz4 of the same raw arrays, no validation, no rebuild.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import lz4.block
import msgpack
import numpy as np

from keisei_stream.shogi import encode_positions
from keisei_stream.experience import schema
from keisei_stream.wire import codec

from batches import benchmark_batches  # noqa: E402 - this script's folder is on sys.path


def _fields(batch):
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in codec.encode_batch(batch).items()}


def _time(fn, reps):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-plies", type=int, default=256)
    args = ap.parse_args()

    batches = benchmark_batches(args.batches, args.positions, max_plies=args.max_plies, num_games=8)
    total = sum(b.num_positions for b in batches)
    encoded = [_fields(b) for b in batches]
    wire = sum(codec.wire_bytes(f) for f in encoded)
    raw_arrays = [{n: np.ascontiguousarray(getattr(b, n)).tobytes() for n in schema.COLUMNS} for b in batches]
    baseline_blobs = [lz4.block.compress(msgpack.packb(a, use_bin_type=True)) for a in raw_arrays]
    mp = args.max_plies

    def enc():
        for b in batches:
            codec.encode_batch(b)

    def dec(check):
        def run():
            for f in encoded:
                codec.decode_entry(f, max_plies=mp, check_legal=check)
        return run

    def dec_inputs():
        for f in encoded:
            d = codec.decode_entry(f, max_plies=mp)
            encode_positions(d.hcp, d.ply, d.repetition, mp)

    def inputs_only():
        for b in batches:
            encode_positions(b.hcp, b.ply, b.repetition, mp)

    def base_enc():
        for a in raw_arrays:
            lz4.block.compress(msgpack.packb(a, use_bin_type=True))

    def base_dec():
        for blob in baseline_blobs:
            d = msgpack.unpackb(lz4.block.decompress(blob), raw=False)
            for n, col in schema.COLUMNS.items():
                np.frombuffer(d[n], col.dtype)

    us = lambda s: round(s / total * 1e6, 3)  # noqa: E731
    t = {
        "encode": _time(enc, args.reps),
        "decode_checked": _time(dec(True), args.reps),
        "decode_unchecked": _time(dec(False), args.reps),
        "decode_checked_plus_inputs": _time(dec_inputs, args.reps),
        "inputs_only": _time(inputs_only, args.reps),
        "baseline_encode": _time(base_enc, args.reps),
        "baseline_decode": _time(base_dec, args.reps),
    }
    out = {
        "benchmark": "codec",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "batches": len(batches),
        "positions": total,
        "segments": sum(b.num_segments for b in batches),
        "bytes_per_position_wire": round(wire / total, 2),
        "bytes_per_position_raw": round(sum(len(lz4.block.decompress(f[b"d"])) for f in encoded) / total, 2),
        "baseline_bytes_per_position": round(sum(len(x) for x in baseline_blobs) / total, 2),
        "us_per_position": {k: us(v) for k, v in t.items()},
        "positions_per_s_per_core": {k: round(total / v) for k, v in t.items()},
        "goal_decode_plus_inputs_positions_per_s": 50_000,
        "notes": "decode_checked replays every game with cshogi (legality, position chain, end "
                 "reasons, repetition counts); inputs = keisei_stream.shogi.encode_positions "
                 "(obs (P,46,9,9) f32 + mask (P,13527) bool); best of reps, one thread",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
