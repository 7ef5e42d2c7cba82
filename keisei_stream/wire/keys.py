"""Redis key names of one run: every key is ``keisei:{run}:<name>`` (the README's "Redis keys" section).

Each worker writes only keys of its own (:mod:`keisei_stream.ops.acl`): its experience stream
``experience:{id}``, its game records ``games:{id}``, its heartbeat ``workers:{id}`` and its
producer record ``producers:{id}``; what it does to them costs only its own positions. The
learner reads every active worker's stream with one ``XREADGROUP`` of its consumer group; the
active workers are the set ``roster``, kept by whoever creates the workers' users (``keisei
users``, ``keisei run``), never discovered by ``SCAN``.

Besides the keys every process reads (streams, weights, heartbeats, status, control, config) this
module names the bookkeeping keys of the producer, consumer, weights publisher and supervisor:

- ``accounting`` (hash, written by the learner only): monotone counters of what the learner
  settled, per worker: field ``{name}:{worker}`` for each name of :data:`ACCOUNTING_FIELDS`
  (a run's total is the sum, :func:`keisei_stream.wire.status.read_accounting`).
- ``producers:{id}`` (stream of one entry, written by worker ``id`` only, in the same
  ``MULTI/EXEC`` as each entry it adds): that worker's record: ``session``, ``seq`` (the last
  batch it added, which makes a retried add recognisable), ``positions`` and ``batches`` added in
  all, ``discarded`` positions of games dropped at its stops. The run's ``produced_positions`` is
  the sum over the records, so the invariant, once the streams are drained, is, per worker and in
  all, ``produced_positions == trained_positions + stale_positions + rejected_positions +
  duplicate_positions`` for batches added through :class:`keisei_stream.wire.producer.Producer`.
- ``credit`` (hash, written by the learner): ``{id}`` -> the entries worker ``id`` may hold
  unacknowledged in its stream (the learner's backpressure, :mod:`keisei_stream.wire.consumer`).
- ``confined`` (hash, written by the learner): per worker ``{counter}:{id}``, what the learner
  saw a worker's credential do to its own keys (:data:`CONFINED_FIELDS`).
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

#: Counters of the ``confined`` hash, each per worker (``{name}:{id}``): ``overruns`` (times the
#: learner found the worker's stream longer than its credit), ``overrun_entries`` (by how many
#: entries, the last time), ``future_ids`` (entries whose stream id lies in the future: a huge id
#: that exhausts the stream's ids), ``stream_resets`` (times the learner emptied and recreated the
#: stream after that), ``unproven_endings`` (segments whose repetition ending the learner could
#: not prove: trained as a cut valued 0), ``repetition_clamped`` (positions whose repetition count
#: the learner could not prove: lowered to what it could).
CONFINED_FIELDS: tuple[str, ...] = ("overruns", "overrun_entries", "future_ids", "stream_resets",
                                    "unproven_endings", "repetition_clamped")

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
    def experience(self, worker_id: str) -> str:
        """Experience stream of one worker (consumer group :attr:`group`); only that worker adds
        to it, only the learner trims it (``XDEL`` of what it settled)."""
        return self.prefix + "experience:" + check_id(worker_id, "worker id")

    @property
    def experience_pattern(self) -> str:
        """SCAN pattern matching every worker's experience stream (for tools; the learner reads
        the :attr:`roster`)."""
        return self.prefix + "experience:*"

    def worker_games(self, worker_id: str) -> str:
        """Capped stream of one worker's finished games; the learner moves them into :attr:`games`."""
        return self.prefix + "games:" + check_id(worker_id, "worker id")

    deadletter = _Key("deadletter", "Capped stream of rejected entries with the reason.")
    metrics = _Key("metrics", "Capped stream: one entry per learner update.")
    games = _Key("games", "Capped stream of finished games (USI moves, result), written by the learner from the "
                          "workers' own game streams.")
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
    roster = _Key("roster", "Set of the active worker ids, kept by who creates the workers' users (keisei users, "
                            "keisei run): the learner reads their experience streams.")
    credit = _Key("credit", "Hash worker id -> entries that worker may hold unacknowledged in its stream (learner).")
    confined = _Key("confined", "Hash ``{counter}:{worker}``: what a worker's credential did to its own keys "
                                "(:data:`CONFINED_FIELDS`, learner).")
    config = _Key("config", "String: the run's resolved config (JSON), written by the learner.")
    control = _Key("control", "String: ``run`` / ``pause`` / ``stop``.")
    learner = _Key("learner", "Hash: learner status.")
    accounting = _Key("accounting", "Hash of position counters per worker (``{name}:{worker}``, :data:`ACCOUNTING_FIELDS`).")
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
        """Consumer group of the learners on every :meth:`experience` stream."""
        return "learners"
