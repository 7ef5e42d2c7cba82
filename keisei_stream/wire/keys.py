"""Redis key names of one run: every key is ``keisei:{run}:<name>`` (the README's "Redis keys" section).

Besides the keys every process reads (streams, weights, heartbeats, status, control, config) this
module names the bookkeeping keys of the producer, consumer, weights publisher and supervisor:

- ``accounting`` (hash, written by the learner only): monotone counters of what the learner
  settled (:data:`ACCOUNTING_FIELDS`).
- ``producers:{id}`` (stream of one entry, written by worker ``id``'s admission script only):
  that worker's record: ``session``, ``seq`` (the last batch it added, which makes the admission
  script idempotent), ``positions`` and ``batches`` added in all, ``discarded`` positions of
  games dropped at its stops. The run's ``produced_positions`` is the sum over the records, so
  the invariant, once the stream is drained, is ``produced_positions == trained_positions +
  stale_positions + rejected_positions + duplicate_positions`` for batches added through
  :class:`keisei_stream.wire.producer.Producer` (:func:`keisei_stream.wire.status.read_accounting`).
- ``weights:index`` (sorted set): ``sha256`` of each published blob scored by version, so
  that only the last K blobs are kept.
- ``supervisor`` (hash, written by ``keisei run``): restarts of the workers it supervises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
    "double_acks",
)

#: Fields of a worker's producer record ``producers:{id}`` (all integers but ``session``).
PRODUCER_FIELDS: tuple[str, ...] = ("session", "seq", "positions", "batches", "discarded")

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


class _Key:
    """A key of the run, read as an attribute of :class:`Keys`: the run's prefix plus ``name``."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.__doc__ = doc

    def __get__(self, keys: "Keys | None", owner: type) -> Any:
        return self if keys is None else keys.prefix + self.name


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
    experience = _Key("experience", "Stream of experience batches (consumer group :attr:`group`); never trimmed.")
    deadletter = _Key("deadletter", "Capped stream of rejected entries with the reason.")
    metrics = _Key("metrics", "Capped stream: one entry per learner update.")
    games = _Key("games", "Capped stream of finished games (USI moves, result).")
    eval = _Key("eval", "Capped stream of evaluation results.")
    losses = _Key("losses", "Stream: one entry per Redis restart that lost the run's data, with what was lost.")

    # workers
    @property
    def workers_pattern(self) -> str:
        """SCAN pattern matching every worker heartbeat hash."""
        return self.prefix + "workers:*"

    def worker(self, worker_id: str) -> str:
        """Heartbeat of one worker: a stream holding its newest heartbeat only (``MAXLEN 1``)."""
        return self.prefix + "workers:" + check_id(worker_id, "worker id")

    @property
    def producers_pattern(self) -> str:
        """SCAN pattern matching every producer record."""
        return self.prefix + "producers:*"

    def producer(self, worker_id: str) -> str:
        """Producer record of one worker: a stream holding its newest record only (``MAXLEN 1``)."""
        return self.prefix + "producers:" + check_id(worker_id, "worker id")

    # plain keys
    config = _Key("config", "String: the run's resolved config (JSON), written by the learner.")
    control = _Key("control", "String: ``run`` / ``pause`` / ``stop``.")
    learner = _Key("learner", "Hash: learner status.")
    accounting = _Key("accounting", "Hash of position counters (:data:`ACCOUNTING_FIELDS`).")
    supervisor = _Key("supervisor", "Hash: ``worker_restarts`` and ``restarts:{id}`` counted by ``keisei run``.")
    trained_batches = _Key("trained_batches", "Sorted set of the batch ids acknowledged (score: unix ms), the newest "
                                              "TRAINED_BATCHES_KEPT: a replayed batch is dropped even after a learner restart.")
    epoch = _Key("epoch", "String: random id the learner writes when the run's data is new on this server; "
                          "missing or changed after an outage means the server lost the data.")

    # weights
    def weights_blob(self, sha256: str) -> str:
        """String key holding the safetensors bytes whose SHA-256 (hex) is ``sha256``."""
        return self.prefix + "weights:blob:" + sha256

    weights_latest = _Key("weights:latest", "Hash ``version, sha256, bytes, dtype, created`` of the newest weights.")
    weights_index = _Key("weights:index", "Sorted set of blob SHA-256s scored by version (to prune all but the last K).")
    weights_channel = _Key("weights", "Pub/sub channel announcing each new version number (a hint only).")

    @property
    def group(self) -> str:
        """Consumer group of the learners on :attr:`experience`."""
        return "learners"
