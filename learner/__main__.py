"""``python -m learner --config FILE --redis URL --run ID [--resume]``: the PPO learner."""

from __future__ import annotations

import argparse
import logging
import sys

from keisei_stream.config import EXIT_CONFIG, ConfigError, load_config
from keisei_stream.wire.client import add_redis_argument


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learner", description=__doc__)
    p.add_argument("--config", required=True, help="YAML run configuration (configs/*.yaml)")
    add_redis_argument(p)
    p.add_argument("--run", default=None, help="run id (default: the config's run.id)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--consumer", default=None,
                   help="consumer name in the group, stable across restarts (default learner-0; under torchrun "
                        "with several ranks NAME-RANK, default learner-RANK)")
    p.add_argument("--max-updates", type=int, default=None, help="stop after this many updates")
    p.add_argument("--quiet", action="store_true", help="no per-update console line")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.run:
            cfg.run.id = args.run  # validated on assignment
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Imported here, not at the top: a bad argument or config fails before torch loads (~1 s).
    from learner.learner import run_learner

    try:
        run_learner(cfg, args.redis, resume=args.resume, consumer_name=args.consumer,
                    max_updates=args.max_updates, quiet=args.quiet)
    except ConfigError as exc:  # e.g. a device torch cannot use: restarting would not help
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
