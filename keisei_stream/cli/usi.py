"""``keisei usi --checkpoint FILE``: the trained policy as a USI engine on stdin/stdout
(:mod:`keisei_stream.play.engine`). A GUI registers it as ``python -m keisei_stream.cli usi
--checkpoint FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keisei_stream.play.engine import run_engine


def command(args: argparse.Namespace) -> int:
    """``keisei usi``: serve the protocol until ``quit`` or end of input.

    Returns:
        0, or 2 (message on stderr) for a missing checkpoint or a negative ``--temperature``.
    """
    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    if args.temperature < 0:
        print("error: --temperature must be >= 0", file=sys.stderr)
        return 2
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    try:
        return run_engine(sys.stdin, sys.stdout, args.checkpoint, temperature=args.temperature,
                          device=args.device, seed=args.seed, name=args.name, log=log,
                          threads=max(1, args.threads))
    finally:
        if log is not None:
            log.close()
