"""Redis key names of one run: every key is ``keisei:{run}:<name>``; :func:`key_table` lists them
(the manual's Redis keys page is generated from it).

The accounting's invariant, once the stream is drained: ``produced_positions == trained_positions
+ stale_positions + rejected_positions + duplicate_positions``, where ``produced_positions`` is the
sum over the workers' producer records ``producers:{id}`` (written only by each worker's admission
script, :class:`keisei_stream.wire.producer.Producer`) and the rest are the learner's
``accounting`` counters (:func:`keisei_stream.wire.status.read_accounting`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

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
    """A key of the run, read as an attribute of :class:`Keys`: the run's prefix plus ``name``.

    ``kind`` (Redis type), ``writer`` (who writes it) and the docstring are what the manual's
    generated keys table shows (:func:`key_table`)."""

    def __init__(self, name: str, kind: str, writer: str, doc: str):
        self.name, self.pattern, self.kind, self.writer = name, name, kind, writer
        self.__doc__ = doc

    def __get__(self, keys: "Keys | None", owner: type) -> Any:
        return self if keys is None else keys.prefix + self.name


def _family(pattern: str, kind: str, writer: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Marks a method of :class:`Keys` that makes one key of a family (``workers:{id}``): the
    manual's keys table lists it under ``pattern`` with its docstring."""
    def mark(method: Callable[..., str]) -> Callable[..., str]:
        method.key_info = (pattern, kind, writer)  # type: ignore[attr-defined]
        return method
    return mark


@dataclass(frozen=True)
class Keys:
    """All Redis key names of run ``run`` (``[A-Za-z0-9_.-]{1,64}``, the config's ``run.id``):
    every key is ``keisei:{run}:<name>``; :func:`key_table` lists them with their types.

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
    experience = _Key("experience", "stream", "workers (admission script)",
                      "Experience batches, one entry per batch (fields `d w v n s`, see the wire format); "
                      "consumer group `learners`. Never trimmed: the learner deletes what it acknowledged, so "
                      "`XLEN` is the backlog.")
    deadletter = _Key("deadletter", "stream (capped)", "learner",
                      "Rejected entries: `reason`, the original entry id, worker, consumer, raw fields (each cut "
                      "to 4 KB); capped at `stream.deadletter_maxlen`.")
    metrics = _Key("metrics", "stream (capped)", "learner",
                   "One entry per update: `version`, `updates` and every training metric (losses, entropy, "
                   "policy lag, importance weights, game statistics, time shares); capped at "
                   "`stream.metrics_maxlen`.")
    games = _Key("games", "stream (capped)", "workers",
                 "Finished self-play games: `start_sfen`, `moves` (USI), `result`, `reason`, `plies`, "
                 "`worker`, `version`; consumer group `recorders` (the learner's game archive); capped at "
                 "`stream.games_maxlen`.")
    eval = _Key("eval", "stream (capped)", "evaluator (`keisei eval --follow`)",
                "One entry per evaluated version and opponent: `version opponent games wins losses draws score "
                "elo elo_lo elo_hi los rating rating_lo rating_hi time`; capped at `stream.eval_maxlen`.")
    losses = _Key("losses", "stream", "learner",
                  "One entry per Redis restart that lost the run's data: old and new epoch, the accounting "
                  "before, unread positions lost, held positions kept.")

    # workers
    @property
    def workers_pattern(self) -> str:
        """SCAN pattern matching every worker heartbeat hash."""
        return self.prefix + "workers:*"

    @_family("workers:{id}", "stream of one entry (`MAXLEN 1`)", "that worker")
    def worker(self, worker_id: str) -> str:
        """Heartbeat of worker `{id}`: `host`, `pid`, `state`, `device`, `version`, `positions`, `games`,
        `positions_per_s`, `backpressure_s`, `oom_waits`, `discarded_positions`, `server_restarts`,
        `last_seen`, outage counters; older than `stream.heartbeat_ttl_s`: shown as not alive."""
        return self.prefix + "workers:" + check_id(worker_id, "worker id")

    @property
    def producers_pattern(self) -> str:
        """SCAN pattern matching every producer record."""
        return self.prefix + "producers:*"

    @_family("producers:{id}", "stream of one entry (`MAXLEN 1`)", "that worker's admission script")
    def producer(self, worker_id: str) -> str:
        """Producer record of worker `{id}`: `session` and `seq` of its last admitted batch (a
        retried add is not added twice), `positions` and `batches` admitted in all, `discarded`
        positions of games dropped at its stops; their sum over workers is `produced_positions`."""
        return self.prefix + "producers:" + check_id(worker_id, "worker id")

    # plain keys
    config = _Key("config", "string (JSON)", "learner",
                  "The run's resolved config; a worker needs only the Redis URL and the run id.")
    control = _Key("control", "string", "operators, `keisei run`",
                   "`run`, `pause` or `stop`, read by every worker about 4 times a second.")
    learner = _Key("learner", "hash", "learner",
                   "Learner status: `state`, `version`, `updates`, `samples_per_s`, `policy_lag_mean`, "
                   "`backlog`, `held_positions`, `time_to_first_update_s`, the last update's losses and game "
                   "statistics, outage counters.")
    accounting = _Key("accounting", "hash", "learner",
                      "Exact counters of what the learner settled (`trained_positions`, `stale_positions`, "
                      "`rejected_positions`, `duplicate_positions`, ...: `ACCOUNTING_FIELDS`).")
    supervisor = _Key("supervisor", "hash", "`keisei run`",
                      "Restarts it made: `worker_restarts`, `learner_restarts`, `redis_restarts`, "
                      "`restarts:{name}`.")
    trained_batches = _Key("trained_batches", "sorted set", "learner",
                           "The newest 100,000 acknowledged batch ids (score: unix ms): a replayed batch is "
                           "dropped, also after a learner restart.")
    epoch = _Key("epoch", "string", "learner",
                 "Random id written when the run's data is new on this server; missing or changed after an "
                 "outage means the server lost the data.")
    elo = _Key("elo", "hash", "evaluator (`keisei eval --follow`)",
               "Elo over versions, random mover = 0: `v:{version}` (JSON rating), `anchor:{opponent}`, "
               "`latest`, `last_version`.")
    oom_gate = _Key("oom-gate", "never written", "nobody",
                    "Named by the learner's atomic script on Redis 6.2 (a `DEL` of it opens the script, so a "
                    "full server runs it whole); the key itself never exists.")

    # weights
    @_family("weights:blob:{sha256}", "string", "learner")
    def weights_blob(self, sha256: str) -> str:
        """Weights as safetensors bytes, named by their SHA-256 (hex); the last `stream.weights_keep`
        are kept."""
        return self.prefix + "weights:blob:" + sha256

    weights_latest = _Key("weights:latest", "hash", "learner",
                          "The newest weights: `version`, `sha256`, `bytes`, `dtype`, `created`.")
    weights_index = _Key("weights:index", "sorted set", "learner",
                         "Blob SHA-256s scored by version, to prune all but the last `stream.weights_keep`.")
    weights_channel = _Key("weights", "pub/sub channel", "learner",
                           "The new version number, published after `weights:latest` is set (a wake-up hint; "
                           "workers also poll).")

    @property
    def group(self) -> str:
        """Consumer group of the learners on :attr:`experience`."""
        return "learners"


class KeyRow(NamedTuple):
    """One key of a run as the manual lists it: ``pattern`` after the ``keisei:{run}:`` prefix
    (``{id}``-style placeholders for a family), the Redis ``kind``, the ``writer`` and ``meaning``;
    ``attribute``: the :class:`Keys` attribute or method that makes it."""

    pattern: str
    kind: str
    writer: str
    meaning: str
    attribute: str


def key_table() -> list[KeyRow]:
    """Every key of :class:`Keys` (plain keys and key families), in the order the class defines
    them: what the manual's Redis keys page shows (generated, so it cannot go stale)."""
    rows = []
    for attr, value in vars(Keys).items():
        if isinstance(value, _Key):
            rows.append(KeyRow(value.pattern, value.kind, value.writer, " ".join(value.__doc__.split()), attr))
        elif callable(value) and hasattr(value, "key_info"):
            pattern, kind, writer = value.key_info
            rows.append(KeyRow(pattern, kind, writer, " ".join((value.__doc__ or "").split()), attr))
    return rows
