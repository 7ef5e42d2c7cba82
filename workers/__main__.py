"""``python -m workers --redis URL [--read-redis URL] --run ID [--games N] [--threads T]``: one self-play worker."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from keisei_stream.config import EXIT_CONFIG, ConfigError
from keisei_stream.wire.client import add_redis_argument


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    add_redis_argument(p)
    p.add_argument("--read-redis", default=os.environ.get("KEISEI_READ_REDIS"),
                   help="where to read the config, control and weights: this host's read-only copy of the run "
                        "(keisei relay's unix socket, or a replica of the primary), so the host fetches each "
                        "version once; writes still go to --redis (default: the environment variable "
                        "KEISEI_READ_REDIS, else --redis)")
    p.add_argument("--run", required=True, help="run id (the learner writes the run's config under keisei:{run}:config)")
    p.add_argument("--games", type=int, default=None, help="games played at once (default: config worker.games)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: config worker.threads)")
    p.add_argument("--device", default=None,
                   help="where the forward pass runs: auto, cpu, cuda, cuda:N (default: config worker.device)")
    p.add_argument("--id", default=None, help="worker id (default: host-pid)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-batches", type=int, default=None, help="stop after sending this many batches")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Imported here, not at the top: a bad argument or config fails before torch loads (~1 s).
    from workers.worker import run_worker

    try:
        run_worker(args.redis, args.run, games=args.games, threads=args.threads, worker_id=args.id,
                   seed=args.seed, device=args.device, max_batches=args.max_batches,
                   read_url=args.read_redis)
    except ConfigError as exc:  # the run's config or the device cannot work: restarting would not help
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
