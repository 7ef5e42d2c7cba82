"""What several commands share: where a local run's Redis URL is recorded, whether that Redis
still answers, the run directory, and the console."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console

from keisei_stream.wire import client

#: seconds a probe waits for the run's Redis to answer PING before the command reads the files a
#: finished run leaves in its directory instead
PROBE_TIMEOUT_S = 2.0


def url_file(run_dir: Path) -> Path:
    """Where ``keisei run`` records the Redis URL of a local run (so ``keisei status`` finds it)."""
    return run_dir / "redis.url"


def run_dir(args: argparse.Namespace) -> Path:
    """``--runs-dir``/``--run``: the run's directory (``runs/{run}``: checkpoints, games archive,
    eval files, final status)."""
    return Path(args.runs_dir) / args.run


@dataclass
class RunRedis:
    """The outcome of :func:`find_redis`: ``client`` answers, or is None and ``why`` says why
    (for messages); ``url``: the URL tried (None when there was none to try)."""

    url: Optional[str]
    client: Optional[redis.Redis]
    why: str = ""


def find_redis(args: argparse.Namespace, timeout: float = PROBE_TIMEOUT_S) -> RunRedis:
    """The run's Redis if it answers: ``--redis``, else the URL a local ``keisei run`` recorded.

    A probe client without retries PINGs the server (at most ``timeout`` seconds; the clients of
    :func:`keisei_stream.wire.client.connect` wait out outages forever, which is right for
    a run's processes but would hang a command on a finished run). A finished local run has
    stopped its private Redis and removed ``redis.url``; a run that was killed leaves a
    ``redis.url`` that nothing answers.

    Returns:
        :class:`RunRedis`; its ``client`` is a normal :func:`~keisei_stream.wire.client.connect` client.

    Raises:
        SystemExit: a malformed URL.
    """
    url = args.redis
    if not url:
        f = url_file(run_dir(args))
        if not f.exists():
            return RunRedis(None, None, f"no --redis given and no {f}: the run has stopped, or never ran here")
        url = f.read_text().strip()
    try:
        probe = client.connect(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=timeout,
                                       socket_timeout=timeout, health_check_interval=0)
        probe.ping()
    except ValueError as exc:
        raise SystemExit(f"error: bad Redis URL {url!r}: {exc}") from None
    except (redis.RedisError, OSError) as exc:
        return RunRedis(url, None, f"the Redis at {url} does not answer ({type(exc).__name__})")
    return RunRedis(url, client.connect(url))


def make_console() -> Console:
    """A rich console on stdout; 160 columns wide when the output is a file or pipe (logs stay readable)."""
    c = Console()
    return c if c.is_terminal else Console(width=160)
