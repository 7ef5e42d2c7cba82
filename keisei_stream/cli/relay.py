"""``keisei relay``: keep this host's read-only copy of a run (:mod:`keisei_stream.ops.relay`), from
which the host's workers read the config, control and weights (``python -m workers --read-redis``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from keisei_stream.ops import embedded_redis, relay
from keisei_stream.wire import retry


def command(args: argparse.Namespace) -> int:
    """Start the host's server and relay until SIGTERM/SIGINT; print the workers' read URL first.

    Returns:
        0 after a stop; 2 when the host's server cannot start or the URL has no password.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = retry.StopFlag()
    socket_path = Path(args.socket).resolve()
    try:
        rl, server, read_url = relay.start_host_copy(args.redis, args.run, socket_path,
                                                     Path(args.dir or socket_path.parent), args.maxmemory)
    except (embedded_redis.RedisStartError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    try:
        print(f"keisei relay for run {args.run}: this host's workers read from --read-redis {read_url}", flush=True)
        relay.run_relay(rl, stop)
    finally:
        server.stop()
    return 0
