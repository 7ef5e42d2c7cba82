"""``keisei usi --checkpoint FILE``: the trained network with tree search as a USI engine on
stdin/stdout (:mod:`keisei_stream.play.engine.usi_server`). A GUI registers it as ``python -m
keisei_stream.cli usi --checkpoint FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keisei_stream.play.engine.usi_options import OPTIONS
from keisei_stream.play.engine.usi_server import run_engine


def command(args: argparse.Namespace) -> int:
    """``keisei usi``: serve the protocol until ``quit`` or end of input.

    Returns:
        0; 1 when the checkpoint cannot be loaded at ``isready``; 2 (message on stderr) for a
        missing checkpoint or an argument outside its USI option's range.
    """
    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    checks = {"Temperature": str(args.temperature), "Nodes": str(args.nodes), "BatchSize": str(args.batch_size),
              "Threads": str(args.threads), "Seed": str(args.seed)}
    by_name = {o.name: o for o in OPTIONS}
    for opt, text in checks.items():
        try:
            by_name[opt].parse(text)
        except ValueError as exc:
            flag = {"BatchSize": "batch-size"}.get(opt, opt.lower())
            print(f"error: --{flag} {text}: {exc}", file=sys.stderr)
            return 2
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    try:
        return run_engine(sys.stdin, sys.stdout, args.checkpoint, temperature=args.temperature,
                          device=args.device, seed=args.seed, name=args.name, log=log,
                          threads=args.threads, nodes=args.nodes, batch_size=args.batch_size)
    finally:
        if log is not None:
            log.close()
