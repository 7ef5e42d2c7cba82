"""Redis key names of one run: every key is ``keisei:{run}:<name>``; :func:`key_table` lists them
(the manual's Redis keys page is generated from it).

The accounting's invariant, once the streams are drained, per worker and in all:
``produced_positions == trained_positions + stale_positions + rejected_positions +
duplicate_positions``, where ``produced_positions`` is the sum over the workers' producer records
``producers:{id}`` (each written only by that worker, in the same ``MULTI/EXEC`` as each entry it
adds, :class:`keisei_stream.wire.producer.Producer`) and the rest are the learner's ``accounting``
counters, kept per worker (:func:`keisei_stream.wire.status.read_accounting`). After a failover
that lost adds the old primary had acknowledged, the workers were told of
``produced_positions + worker_lost_positions`` (the records' ``lost_positions``).

Each worker writes only keys of its own (:mod:`keisei_stream.ops.acl`): its experience stream
``experience:{id}``, its game records ``games:{id}``, its heartbeat ``workers:{id}`` and its
producer record ``producers:{id}``; what it does to them costs only its own positions. The
learner reads every active worker's stream with one ``XREADGROUP`` of its consumer group; the
active workers are the set ``roster``, kept by whoever creates the workers' users (``keisei
users``, ``keisei run``), never discovered by ``SCAN``.
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

#: Counters of the ``confined`` hash, each per worker (``{name}:{id}``): ``overruns`` (times the
#: learner found the worker's stream longer than its credit), ``overrun_entries`` (by how many
#: entries, the last time), ``future_ids`` (entries whose stream id lies in the future: a huge id
#: that exhausts the stream's ids), ``stream_resets`` (times the learner emptied and recreated the
#: stream after that), ``unproven_endings`` (segments whose repetition ending the learner could
#: not prove: trained as a cut valued 0), ``repetition_clamped`` (positions whose repetition count
#: the learner could not prove: lowered to what it could).
CONFINED_FIELDS: tuple[str, ...] = ("overruns", "overrun_entries", "future_ids", "stream_resets",
                                    "unproven_endings", "repetition_clamped")

#: Fields of a worker's producer record ``producers:{id}`` (all integers but ``session``; the record
#: also holds ``discard_seq`` and ``lost_reason``, text). ``lost_positions`` and ``lost_batches``:
#: adds the server acknowledged and a failover lost (never replicated), counted by the worker
#: (:class:`keisei_stream.wire.producer.Producer`).
PRODUCER_FIELDS: tuple[str, ...] = ("session", "seq", "positions", "batches", "discarded", "lost_positions",
                                    "lost_batches")

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
    @_family("experience:{id}", "stream", "that worker")
    def experience(self, worker_id: str) -> str:
        """Experience batches of worker `{id}`, one entry per batch (fields `d w v n s`, see the wire
        format); consumer group `learners`. Only that worker adds to it (while it holds fewer entries
        than its `credit`); only the learner deletes from it (`XDEL` of what it settled), so `XLEN`
        is that worker's backlog."""
        return self.prefix + "experience:" + check_id(worker_id, "worker id")

    @property
    def experience_pattern(self) -> str:
        """SCAN pattern matching every worker's experience stream (for tools; the learner reads
        the :attr:`roster`)."""
        return self.prefix + "experience:*"

    @_family("games:{id}", "stream (capped)", "that worker")
    def worker_games(self, worker_id: str) -> str:
        """Finished games of worker `{id}` (the fields of `games`); the learner moves them into
        `games`; capped at `stream.games_maxlen`."""
        return self.prefix + "games:" + check_id(worker_id, "worker id")

    deadletter = _Key("deadletter", "stream (capped)", "learner",
                      "Rejected entries: `reason`, the original entry id, worker, consumer, raw fields (each cut "
                      "to 4 KB); capped at `stream.deadletter_maxlen`.")
    metrics = _Key("metrics", "stream (capped)", "learner",
                   "One entry per update: `version`, `updates` and every training metric (losses, entropy, "
                   "policy lag, importance weights, game statistics, time shares); capped at "
                   "`stream.metrics_maxlen`.")
    games = _Key("games", "stream (capped)", "learner (from the workers' `games:{id}`)",
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
        `positions_per_s`, `backpressure_s` (seconds waited in all), `backpressure_share` (share of the last
        ~30 s spent waiting on backpressure), `oom_waits`, `credit` (the last it read), `adds_refused`
        (by its own exhausted stream), `games_not_recorded`, `discarded_positions`, `server_restarts`,
        `last_seen`, outage counters; older than `stream.heartbeat_ttl_s`: shown as not alive."""
        return self.prefix + "workers:" + check_id(worker_id, "worker id")

    @property
    def producers_pattern(self) -> str:
        """SCAN pattern matching every producer record."""
        return self.prefix + "producers:*"

    @_family("producers:{id}", "stream of one entry (`MAXLEN 1`)", "that worker")
    def producer(self, worker_id: str) -> str:
        """Producer record of worker `{id}`, written in the same `MULTI/EXEC` as each entry it adds:
        `session` and `seq` of its last added batch (a retried add is recognised and not added
        twice), `positions` and `batches` added in all, `discarded`
        positions of games dropped at its stops; their sum over workers is `produced_positions`.
        `lost_positions`, `lost_batches` and `lost_reason`: adds the server had acknowledged and a
        failover lost (the worker found its record behind what it wrote, with the run's epoch
        unchanged)."""
        return self.prefix + "producers:" + check_id(worker_id, "worker id")

    # plain keys
    roster = _Key("roster", "set", "`keisei users`, `keisei run` (who creates the workers' users)",
                  "The active worker ids: the learner reads their experience streams (never found by `SCAN`).")
    credit = _Key("credit", "hash", "learner",
                  "Worker id -> the entries that worker may hold unacknowledged in its stream: "
                  "`ceil(stream.max_backlog / live workers)` (the backpressure).")
    confined = _Key("confined", "hash", "learner",
                    "`{counter}:{id}`: what worker `{id}`'s credential did to its own keys (`CONFINED_FIELDS`: "
                    "overruns of its credit, future ids, stream resets, unproven endings, clamped repetitions).")
    config = _Key("config", "string (JSON)", "learner",
                  "The run's resolved config; a worker needs only the Redis URL and the run id.")
    control = _Key("control", "string", "operators, `keisei run`",
                   "`run`, `pause` or `stop`, read by every worker once a second (from its host's copy, "
                   "`keisei relay`, where it has one).")
    learner = _Key("learner", "hash", "learner",
                   "Learner status: `state`, `version`, `updates`, `samples_per_s`, `policy_lag_mean`, "
                   "`backlog` (entries in the roster's streams), `held_positions`, `games_in_flight` (games "
                   "its validation follows), `workers_read`, `workers_live`, `time_to_first_update_s`, the "
                   "last update's losses and game statistics, outage counters.")
    accounting = _Key("accounting", "hash", "learner",
                      "Exact counters of what the learner settled, per worker: `{name}:{id}` for each name of "
                      "`ACCOUNTING_FIELDS` (`trained_positions`, `stale_positions`, `rejected_positions`, "
                      "`duplicate_positions`, ...); a run's total is the sum.")
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
        """Consumer group of the learners on every :meth:`experience` stream."""
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
