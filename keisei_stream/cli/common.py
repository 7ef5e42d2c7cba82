"""What several commands share: where a local run's Redis URL is recorded, and the console."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def url_file(run_dir: Path) -> Path:
    """Where ``keisei run`` records the Redis URL of a local run (so ``keisei status`` finds it)."""
    return run_dir / "redis.url"


def resolve_redis(args: argparse.Namespace) -> str:
    """The ``--redis`` URL, else the one recorded by a local ``keisei run`` of ``--run`` under
    ``--runs-dir``.

    Raises:
        SystemExit: neither is there (the message names the file looked for).
    """
    if args.redis:
        return args.redis
    f = url_file(Path(args.runs_dir) / args.run)
    if f.exists():
        return f.read_text().strip()
    raise SystemExit(f"error: no --redis given and no local run found at {f}")


def make_console() -> Console:
    """A rich console on stdout; 160 columns wide when the output is a file or pipe (logs stay readable)."""
    c = Console()
    return c if c.is_terminal else Console(width=160)
