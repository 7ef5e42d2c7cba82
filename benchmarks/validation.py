"""Cost of validating experience entries per position: the decoder with the game-following
validation (a :class:`~keisei_stream.wire.replay.GameBook`, as the learner's consumer runs it),
without it (each segment on its own), and structural only; and, as the baseline in the same run,
another checkout's decoder on the same bytes (``--baseline-src /work/main``: before issue 23).

    python benchmarks/validation.py [--positions 20000] [--repeat 5] [--baseline-src /work/main]

The entries are honest self-play as a worker sends it with the quickstart's settings (64 games,
``max_plies`` 512, 32-ply segments sent 32 plies later, entries of 1,024 positions; uniformly
random moves from :class:`keisei_stream.rl.selfplay.UniformPolicy`), encoded once; every variant
decodes the same bytes, ``--repeat`` times per round. Each round runs this script twice in a
subprocess (``--decode FILE``), with ``PYTHONPATH`` set to the baseline checkout and then to this
one, back to back (the machine's load is shared by both); the median over ``--rounds`` of each
round's median is reported. The baseline calls that checkout's ``decode_entry(fields,
max_plies=..., check_legal=...)``.

Prints one JSON object: ``us_per_position`` per variant (``game_following``: with a GameBook, as
the learner runs it; ``segment_only``: each segment on its own; ``structural``: no replay;
``baseline_checked``, ``baseline_structural``), ``positions``, ``entries``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent


def worker_entries(positions: int, seed: int = 0) -> list[dict]:
    """Encoded entries of honest self-play, cut and batched as a worker does (quickstart settings)."""
    from keisei_stream.rl.selfplay import SelfPlay, UniformPolicy, segments_to_batch
    from keisei_stream.wire.codec import encode_batch

    sp = SelfPlay(UniformPolicy(seed), games=64, max_plies=512, segment_plies=32, lookahead_plies=32, gamma=0.995,
                  lam=0.98, temperature=1.0, seed=seed)
    outbox, out, total = [], [], 0
    while total < positions:
        outbox += sp.step(1).segments
        n = k = 0
        while k < len(outbox) and n < 1024:
            n, k = n + outbox[k].num_positions, k + 1
        if n >= 1024:
            b = segments_to_batch(outbox[:k])
            b.worker_id, b.batch_id = "w0", f"w0:bench:{len(out)}"
            out.append({k2.encode(): (v if isinstance(v, bytes) else str(v).encode())
                        for k2, v in encode_batch(b).items()})
            outbox, total = outbox[k:], total + n
    return out


def time_decode(entries: list[dict], repeat: int, **kw) -> float:
    """Median seconds to decode every entry (``kw`` to ``decode_entry``; ``games=True``: a fresh
    GameBook per pass, committed after each entry as the consumer does)."""
    from keisei_stream.wire.codec import decode_entry

    times = []
    for _ in range(repeat):
        book = None
        if kw.get("games"):
            from keisei_stream.wire.replay import GameBook
            book = GameBook()
        args = {**kw, "games": book} if "games" in kw else kw
        t0 = time.perf_counter()
        for f in entries:
            decode_entry(f, max_plies=512, **args)
            if book is not None:
                book.commit()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decode_in(src: Path, path: str, repeat: int, variants: str) -> dict[str, float]:
    """Run this script's ``--decode`` mode with ``PYTHONPATH=src``; its seconds per variant."""
    env = dict(os.environ, PYTHONPATH=str(src))
    res = subprocess.run([sys.executable, str(HERE / "validation.py"), "--decode", path, "--repeat", str(repeat),
                          "--variants", variants], env=env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-src", default=None, help="another checkout whose decoder is the baseline")
    ap.add_argument("--decode", default=None, help=argparse.SUPPRESS)  # the subprocess's mode
    ap.add_argument("--variants", default="checked,structural", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.decode:  # in a checkout: time its decoder on the given entries
        entries = msgpack.unpackb(Path(args.decode).read_bytes(), raw=True, strict_map_key=False)
        kw = {"checked": dict(check_legal=True), "structural": dict(check_legal=False),
              "game_following": dict(check_legal=True, worker="w0", games=True),
              "segment_only": dict(check_legal=True, worker="w0")}
        print(json.dumps({v: time_decode(entries, args.repeat, **kw[v]) for v in args.variants.split(",")}))
        return
    entries = worker_entries(args.positions)
    positions = sum(int(f[b"n"]) for f in entries)
    here = HERE.parent
    rounds: list[dict[str, float]] = []
    with tempfile.NamedTemporaryFile(suffix=".msgpack", delete=False) as fh:
        fh.write(msgpack.packb(entries))
    try:
        for _ in range(args.rounds):
            r = {}
            if args.baseline_src:
                r.update({f"baseline_{k}": v for k, v in _decode_in(Path(args.baseline_src).resolve(), fh.name,
                                                                     args.repeat, "checked,structural").items()})
            r.update(_decode_in(here, fh.name, args.repeat, "game_following,segment_only,structural"))
            rounds.append(r)
    finally:
        os.unlink(fh.name)
    out = {"benchmark": "validation", "positions": positions, "entries": len(entries), "repeat": args.repeat,
           "rounds": args.rounds, "baseline_src": args.baseline_src,
           "us_per_position": {k: round(1e6 * statistics.median(r[k] for r in rounds) / positions, 3)
                               for k in rounds[0]}}
    if args.baseline_src:
        u = out["us_per_position"]
        out["game_following_minus_baseline_us"] = round(u["game_following"] - u["baseline_checked"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
