"""Redis key names of one run: every key is ``keisei:{run}:<name>`` (the README's "Redis keys" section).

Besides the keys every process reads (streams, weights, heartbeats, status, control, config) this
module names three bookkeeping keys of the producer, consumer and weights publisher:

- ``accounting`` (hash): monotone counters of positions through the pipeline
  (:data:`ACCOUNTING_FIELDS`); the invariant, once the stream is drained, is
  ``produced_positions == trained_positions + stale_positions + rejected_positions
  + duplicate_positions`` for batches added through :class:`keisei_stream.wire.producer.Producer`.
- ``producers`` (hash): ``{worker_id} -> "{session}:{seq}"``, the last batch sequence number
  each producer session added, which makes the admission script idempotent.
- ``weights:index`` (sorted set): ``sha256`` of each published blob scored by version, so
  that only the last K blobs are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Counters of the ``accounting`` hash (all integers, missing = 0).
ACCOUNTING_FIELDS: tuple[str, ...] = (
    "produced_positions",
    "produced_batches",
    "trained_positions",
    "stale_positions",
    "rejected_positions",
    "rejected_entries",
    "duplicate_positions",
    "duplicate_entries",
    "acked_entries",
)

_RUN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a usable run/worker id (``[A-Za-z0-9_.:@-]{1,128}``).

    Raises:
        ValueError: on anything else (empty, too long, spaces, glob characters ...).
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: expected [A-Za-z0-9_.:@-]{{1,128}}")
    return value


@dataclass(frozen=True)
class Keys:
    """All Redis key names of run ``run`` (``[A-Za-z0-9_.-]{1,64}``, the config's ``run.id``).

    Raises:
        ValueError: for an invalid run id.
    """

    run: str

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not _RUN_RE.match(self.run):
            raise ValueError(f"invalid run id {self.run!r}: expected [A-Za-z0-9_.-]{{1,64}}")

    @property
    def prefix(self) -> str:
        """``keisei:{run}:``"""
        return f"keisei:{self.run}:"

    # streams
    @property
    def experience(self) -> str:
        """Stream of experience batches (consumer group :attr:`group`); never trimmed."""
        return self.prefix + "experience"

    @property
    def deadletter(self) -> str:
        """Capped stream of rejected entries with the reason."""
        return self.prefix + "deadletter"

    @property
    def metrics(self) -> str:
        """Capped stream: one entry per learner update."""
        return self.prefix + "metrics"

    @property
    def games(self) -> str:
        """Capped stream of finished games (USI moves, result)."""
        return self.prefix + "games"

    @property
    def eval(self) -> str:
        """Capped stream of evaluation results."""
        return self.prefix + "eval"

    # plain keys
    @property
    def config(self) -> str:
        """String: the run's resolved config (JSON), written by the learner."""
        return self.prefix + "config"

    @property
    def control(self) -> str:
        """String: ``run`` / ``pause`` / ``stop``."""
        return self.prefix + "control"

    @property
    def learner(self) -> str:
        """Hash: learner status."""
        return self.prefix + "learner"

    @property
    def accounting(self) -> str:
        """Hash of position counters (:data:`ACCOUNTING_FIELDS`)."""
        return self.prefix + "accounting"

    @property
    def producers(self) -> str:
        """Hash ``worker_id -> "session:seq"`` of the last batch each producer added."""
        return self.prefix + "producers"

    # weights
    @property
    def weights_latest(self) -> str:
        """Hash ``version, sha256, bytes, dtype, created`` of the newest weights."""
        return self.prefix + "weights:latest"

    def weights_blob(self, sha256: str) -> str:
        """String key holding the safetensors bytes whose SHA-256 (hex) is ``sha256``."""
        return self.prefix + "weights:blob:" + sha256

    @property
    def weights_index(self) -> str:
        """Sorted set of blob SHA-256s scored by version (to prune all but the last K)."""
        return self.prefix + "weights:index"

    @property
    def weights_channel(self) -> str:
        """Pub/sub channel announcing each new version number (a hint only)."""
        return self.prefix + "weights"

    # workers
    def worker(self, worker_id: str) -> str:
        """Heartbeat hash of one worker (with a TTL)."""
        return self.prefix + "workers:" + check_id(worker_id, "worker id")

    @property
    def workers_pattern(self) -> str:
        """SCAN pattern matching every worker heartbeat hash."""
        return self.prefix + "workers:*"

    @property
    def group(self) -> str:
        """Consumer group of the learners on :attr:`experience`."""
        return "learners"
