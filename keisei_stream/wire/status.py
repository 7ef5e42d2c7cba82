"""Run status over Redis: worker heartbeats, learner status, the capped metrics / games / eval
streams, the control key, the stored config, the accounting counters (the learner's ``accounting``
hash plus the workers' producer records), the supervisor's restart counts and the experience
stream's state.

Hash and stream values are written flat (numbers as text, booleans as 0/1, None as empty) and
read back as ``str``. Every function takes a ``redis.Redis`` made by
:func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, Mapping

import redis
from redis.exceptions import ResponseError

from .atomic import write_small
from .client import as_str
from .keys import ACCOUNTING_FIELDS, PRODUCER_FIELDS, Keys


def _flat(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` as values Redis accepts: bool -> 0/1, float -> ``repr``, None -> "", other
    non-(int, str, bytes) -> ``str``; keys -> ``str``."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, float):
            v = repr(v)
        elif v is None:
            v = ""
        elif not isinstance(v, (int, str, bytes)):
            v = str(v)
        out[str(k)] = v
    return out


def write_worker_heartbeat(r: redis.Redis, keys: Keys, worker_id: str, fields: Mapping[str, Any],
                           ttl_s: float | None = None) -> None:
    """Replace the heartbeat of worker ``worker_id`` (plus ``id``, ``pid``, ``last_seen`` unix
    seconds): ``XADD workers:{id} MAXLEN 1``, the only kind of write a worker's Redis user has
    (:mod:`keisei_stream.ops.acl`). ``ttl_s`` is recorded as ``ttl_s``: a heartbeat older than
    that reads as not alive (:func:`read_workers`); the key itself stays (one entry a worker)."""
    data = _flat({"id": worker_id, "last_seen": time.time(), "pid": os.getpid(), **fields})
    if ttl_s is not None:
        data["ttl_s"] = repr(float(ttl_s))
    r.xadd(keys.worker(worker_id), data, maxlen=1, approximate=False)


def read_workers(r: redis.Redis, keys: Keys, max_age_s: float | None = None) -> list[dict[str, str]]:
    """The newest heartbeat of every worker as a dict of strings (sorted by id), with ``alive``
    (``"1"`` while younger than its ``ttl_s``, else ``"0"``); only those seen in the last
    ``max_age_s`` seconds when given. Keys that are not heartbeat streams are skipped."""
    out = []
    now = time.time()
    for k, d in _newest_entries(r, keys.workers_pattern):
        d.setdefault("id", k.rsplit(":", 1)[-1])
        age = now - _float(d.get("last_seen"), 0.0)
        if max_age_s is not None and age > max_age_s:
            continue
        d["alive"] = "1" if age <= _float(d.get("ttl_s"), 30.0) else "0"
        out.append(d)
    return sorted(out, key=lambda d: d.get("id", ""))


#: Keys a ``SCAN`` call looks at (its ``COUNT``): a run's keys are two per worker plus a few dozen,
#: so a few round trips cover 10,000 workers.
SCAN_COUNT = 10_000


def _newest_entries(r: redis.Redis, pattern: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``(key, newest entry's fields as strings)`` of every non-empty stream matching ``pattern``:
    ``SCAN`` (:data:`SCAN_COUNT` keys a call), then one pipelined round trip of ``XREVRANGE ...
    COUNT 1`` over every key found, whatever their number; keys that are not streams are skipped."""
    found = sorted({as_str(k) for k in r.scan_iter(match=pattern, count=SCAN_COUNT)})
    if not found:
        return
    pipe = r.pipeline(transaction=False)
    for k in found:
        pipe.xrevrange(k, count=1)
    for k, last in zip(found, pipe.execute(raise_on_error=False)):
        if isinstance(last, ResponseError):  # WRONGTYPE: not one of ours
            continue
        if isinstance(last, Exception):
            raise last
        if last:
            yield k, {as_str(a): as_str(b) for a, b in last[0][1].items()}


def _int_hash(r: redis.Redis, key: str) -> dict[str, int]:
    """The fields of hash ``key`` whose values are integers, as ints (the others are skipped)."""
    out = {}
    for k, v in r.hgetall(key).items():
        try:
            out[as_str(k)] = int(v)
        except ValueError:
            pass
    return out


def _float(v: Any, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def read_producers(r: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Every worker's producer record (:class:`keisei_stream.wire.producer.Producer` writes it):
    worker id -> ``session`` (str) and ``seq``, ``positions``, ``batches``, ``discarded`` (ints).
    Keys that are not such streams are skipped."""
    out: dict[str, dict[str, Any]] = {}
    head = keys.prefix + "producers:"
    for k, f in _newest_entries(r, keys.producers_pattern):
        rec: dict[str, Any] = {"session": f.get("session", "")}
        for name in PRODUCER_FIELDS[1:]:
            try:
                rec[name] = int(f.get(name, 0))
            except ValueError:
                rec[name] = 0
        out[k[len(head):]] = rec
    return out


def write_learner_status(r: redis.Redis, keys: Keys, fields: Mapping[str, Any]) -> None:
    """``HSET learner`` with ``fields`` (plus ``updated`` unix seconds)."""
    r.hset(keys.learner, mapping=_flat({**fields, "updated": time.time()}))


def read_learner_status(r: redis.Redis, keys: Keys) -> dict[str, str]:
    """The ``learner`` hash as strings (empty when absent)."""
    return {as_str(a): as_str(b) for a, b in r.hgetall(keys.learner).items()}


def append_metrics(r: redis.Redis, keys: Keys, fields: Mapping[str, Any], maxlen: int) -> str:
    """``XADD metrics MAXLEN ~ maxlen``; returns the entry id."""
    return as_str(r.xadd(keys.metrics, _flat(fields), maxlen=maxlen, approximate=True))


def append_game(r: redis.Redis, keys: Keys, record_fields: Mapping[str, Any], maxlen: int) -> str:
    """``XADD games MAXLEN ~ maxlen`` (e.g. ``GameRecord.to_dict()`` plus worker/version)."""
    return as_str(r.xadd(keys.games, _flat(record_fields), maxlen=maxlen, approximate=True))


def append_eval(r: redis.Redis, keys: Keys, fields: Mapping[str, Any], maxlen: int) -> str:
    """``XADD eval MAXLEN ~ maxlen``."""
    return as_str(r.xadd(keys.eval, _flat(fields), maxlen=maxlen, approximate=True))


def append_losses(r: redis.Redis, keys: Keys, fields: Mapping[str, Any]) -> str:
    """``XADD losses`` (never trimmed: one entry per server restart that lost the run's data)."""
    return as_str(r.xadd(keys.losses, _flat(fields)))


def read_stream(r: redis.Redis, key: str, count: int = 100) -> list[tuple[str, dict[str, str]]]:
    """The newest ``count`` entries of a capped stream, oldest first, as strings."""
    items = r.xrevrange(key, count=count)
    return [(as_str(i), {as_str(a): as_str(b) for a, b in f.items()}) for i, f in reversed(items)]


CONTROL_VALUES = ("run", "pause", "stop")
#: Seconds between a worker's reads of ``control`` (and ``keisei relay``'s, on the primary): a stop
#: or a pause takes effect within this (twice through a relay), plus one step.
CONTROL_S = 1.0


def get_control(r: redis.Redis, keys: Keys) -> str:
    """``run``, ``pause`` or ``stop``; ``run`` when unset or unrecognised."""
    v = r.get(keys.control)
    v = as_str(v).strip().lower() if v is not None else "run"
    return v if v in CONTROL_VALUES else "run"


def set_control(r: redis.Redis, keys: Keys, value: str) -> None:
    """Set the control key (also on a full server: :func:`keisei_stream.wire.atomic.write_small`).

    Raises:
        ValueError: for a value other than run/pause/stop.
    """
    if value not in CONTROL_VALUES:
        raise ValueError(f"control must be one of {CONTROL_VALUES}, got {value!r}")
    write_small(r, keys, ("SET", keys.control, value), f"control={value}")


def write_config(r: redis.Redis, keys: Keys, text: str) -> None:
    """Store the run's resolved config (JSON text) under ``config`` (also on a full server:
    :func:`keisei_stream.wire.atomic.write_small`; nothing is written when it is already there)."""
    if r.get(keys.config) != (text.encode() if isinstance(text, str) else text):
        write_small(r, keys, ("SET", keys.config, text), "the run's config")


def read_config(r: redis.Redis, keys: Keys) -> str | None:
    """The stored config text, or None."""
    v = r.get(keys.config)
    return None if v is None else as_str(v)


def read_accounting(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The run's position accounting as ints, every field of ``ACCOUNTING_FIELDS`` present (0 if
    unset): the learner's ``accounting`` hash, plus the sums over the workers' producer records
    (:func:`read_producers`): ``produced_positions``, ``produced_batches`` and
    ``worker_discarded_positions``. (A run from before the producer records kept these in the
    hash; what is there is added.)"""
    d = {f: 0 for f in ACCOUNTING_FIELDS}
    d["worker_discarded_positions"] = 0
    d.update(_int_hash(r, keys.accounting))
    for rec in read_producers(r, keys).values():
        d["produced_positions"] += rec["positions"]
        d["produced_batches"] += rec["batches"]
        d["worker_discarded_positions"] += rec["discarded"]
    return d


def stream_positions(r: redis.Redis, keys: Keys, page: int = 1000) -> int:
    """Positions in the entries still in the experience stream (the sum of their ``n`` fields,
    read with ``XRANGE`` pages of ``page``; an entry without a readable ``n`` counts 0)."""
    total, start = 0, "-"
    while True:
        items = r.xrange(keys.experience, min=start, count=page)
        for _id, fields in items:
            try:
                total += max(0, int(fields.get(b"n", fields.get("n", 0))))
            except (TypeError, ValueError):
                pass
        if len(items) < page:
            return total
        start = "(" + as_str(items[-1][0])


def count_restart(r: redis.Redis, keys: Keys, name: str) -> None:
    """Count one restart by ``keisei run`` of ``name`` (a worker id, ``learner`` or ``redis``) in
    the ``supervisor`` hash: ``restarts:{name}`` and the total ``worker_restarts``,
    ``learner_restarts`` or ``redis_restarts``."""
    total = "learner_restarts" if name == "learner" else "redis_restarts" if name == "redis" else "worker_restarts"
    pipe = r.pipeline(transaction=True)
    pipe.hincrby(keys.supervisor, total, 1)
    pipe.hincrby(keys.supervisor, f"restarts:{name}", 1)
    pipe.execute()


def read_supervisor(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The ``supervisor`` hash as ints (``worker_restarts``, ``learner_restarts``, ``redis_restarts``,
    ``restarts:{name}``; empty when unset)."""
    return _int_hash(r, keys.supervisor)


def stream_info(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Experience stream state.

    Returns:
        ``length`` (XLEN), ``backlog`` (= length: acknowledged entries are deleted, so this is the
        unacknowledged count that admission uses), ``pending`` (delivered, not acknowledged),
        ``lag`` (XINFO GROUPS lag, never delivered; None when Redis reports nil after XDEL —
        then ``length - pending`` is the estimate in ``undelivered``), ``undelivered``,
        ``consumers``, ``deadletter`` (XLEN of the deadletter stream).
    """
    pipe = r.pipeline(transaction=False)
    pipe.xlen(keys.experience)
    pipe.xlen(keys.deadletter)
    length, dead = pipe.execute()
    pending = 0
    lag = None
    consumers = 0
    try:
        groups = r.xinfo_groups(keys.experience)
    except ResponseError:
        groups = []
    for gi in groups:
        g = {as_str(k): v for k, v in gi.items()}
        if as_str(g.get("name", "")) == keys.group:
            pending = int(g.get("pending") or 0)
            consumers = int(g.get("consumers") or 0)
            raw_lag = g.get("lag")
            lag = int(raw_lag) if raw_lag is not None else None
    undelivered = lag if lag is not None else max(0, int(length) - pending)
    return {"length": int(length), "backlog": int(length), "pending": pending, "lag": lag,
            "undelivered": undelivered, "consumers": consumers, "deadletter": int(dead)}
