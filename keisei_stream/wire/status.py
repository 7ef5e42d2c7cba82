"""Run status over Redis: the roster of active workers, worker heartbeats, learner status, the
capped metrics / games / eval streams, the control key, the stored config, the accounting counters
(the learner's ``accounting`` hash, per worker, plus the workers' producer records), the credit
and confinement counters per worker, the supervisor's restart counts and the experience streams'
state.

Hash and stream values are written flat (numbers as text, booleans as 0/1, None as empty) and
read back as ``str``. Every function takes a ``redis.Redis`` made by
:func:`keisei_stream.wire.client.connect`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterator, Mapping

import redis
from redis.exceptions import ResponseError

from keisei_stream.shogi import GameRecord

from .atomic import write_small
from .client import as_str
from .keys import ACCOUNTING_FIELDS, CONFINED_FIELDS, PRODUCER_FIELDS, Keys, check_id


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


def heartbeat_alive(fields: Mapping[str, str], now: float) -> bool:
    """Whether a heartbeat (its fields as strings) is younger than its own ``ttl_s`` (30 s when
    absent) at unix time ``now``: the one liveness rule of status and credit."""
    return now - _float(fields.get("last_seen"), 0.0) <= _float(fields.get("ttl_s"), 30.0)


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
        d["alive"] = "1" if heartbeat_alive(d, now) else "0"
        out.append(d)
    return sorted(out, key=lambda d: d.get("id", ""))


def alive_workers(r: redis.Redis, keys: Keys, worker_ids: list[str]) -> set[str]:
    """Those of ``worker_ids`` whose newest heartbeat is alive (:func:`heartbeat_alive`): one
    pipelined ``XREVRANGE workers:{id} + - COUNT 1`` each, no ``SCAN``. A heartbeat key that is
    not a stream counts as not alive."""
    if not worker_ids:
        return set()
    pipe = r.pipeline(transaction=False)
    for w in worker_ids:
        pipe.xrevrange(keys.worker(w), count=1)
    now, alive = time.time(), set()
    for w, last in zip(worker_ids, pipe.execute(raise_on_error=False)):
        if isinstance(last, list) and last:
            if heartbeat_alive({as_str(a): as_str(b) for a, b in last[0][1].items()}, now):
                alive.add(w)
    return alive


# ---------------------------------------------------------------------------------------------- roster


def register_workers(r: redis.Redis, keys: Keys, worker_ids: list[str]) -> None:
    """Add ``worker_ids`` to the run's ``roster`` (``SADD``): the learner reads their experience
    streams from its next roster refresh on. Called by whoever creates the workers' users
    (``keisei users``, ``keisei run``), and by a worker whose user may (an admin URL).

    Raises:
        ValueError: an invalid worker id (nothing is added).
    """
    ids = [check_id(w, "worker id") for w in worker_ids]
    if ids:
        r.sadd(keys.roster, *ids)


def read_roster(r: redis.Redis, keys: Keys) -> list[str]:
    """The run's active worker ids, sorted (members that are not valid ids are skipped)."""
    out = []
    for m in r.smembers(keys.roster):
        try:
            out.append(check_id(as_str(m), "worker id"))
        except (ValueError, UnicodeDecodeError):
            continue
    return sorted(out)


def read_credit(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The ``credit`` hash: worker id -> entries it may hold unacknowledged (empty when unset)."""
    return _int_hash(r, keys.credit) if r.type(keys.credit) in (b"hash", "hash") else {}


def read_confined(r: redis.Redis, keys: Keys) -> dict[str, dict[str, int]]:
    """The ``confined`` hash per worker: worker id -> every counter of
    :data:`~keisei_stream.wire.keys.CONFINED_FIELDS` (0 when unset); only workers with a counter."""
    return _per_worker(_int_hash(r, keys.confined), CONFINED_FIELDS)


def _per_worker(fields: Mapping[str, int], names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """``{name}:{worker}`` fields -> worker -> name -> value (every name of ``names`` present)."""
    out: dict[str, dict[str, int]] = {}
    for k, v in fields.items():
        name, sep, worker = k.partition(":")
        if sep and name in names and worker:
            out.setdefault(worker, dict.fromkeys(names, 0))[name] += v
    return out


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
    worker id -> ``session`` and ``lost_reason`` (str) and ``seq``, ``positions``, ``batches``,
    ``discarded``, ``lost_positions``, ``lost_batches`` (ints). Keys that are not such streams are
    skipped."""
    out: dict[str, dict[str, Any]] = {}
    head = keys.prefix + "producers:"
    for k, f in _newest_entries(r, keys.producers_pattern):
        rec: dict[str, Any] = {"session": f.get("session", ""), "lost_reason": f.get("lost_reason", "")}
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


#: The run directory's copy of the ``metrics`` stream (``runs/{run}/metrics.jsonl``), written by the
#: learner beside each entry and kept when a local run's Redis is gone: one JSON object per update,
#: ``time`` (unix seconds) and the entry's fields, a non-finite number written as null.
METRICS_FILE = "metrics.jsonl"


def metrics_line(fields: Mapping[str, Any], now: float) -> str:
    """One line of :data:`METRICS_FILE` (with its newline): ``{"time": now, **fields}``."""
    def value(v: Any) -> Any:
        try:
            return v if math.isfinite(v) else None
        except TypeError:
            return v
    return json.dumps({"time": round(now, 3), **{k: value(v) for k, v in fields.items()}}, default=float) + "\n"


def read_metrics(r: redis.Redis, keys: Keys, page: int = 10_000) -> list[dict[str, float]]:
    """Every entry of the ``metrics`` stream, oldest first, as numbers, with ``time`` (unix
    seconds) taken from the entry id (the time the learner published the update)."""
    out: list[dict[str, float]] = []
    start = "-"
    while True:
        entries = r.xrange(keys.metrics, min=start, count=page)
        for eid, f in entries:
            row = {as_str(a): _number(as_str(b)) for a, b in f.items()}
            row["time"] = int(as_str(eid).split("-")[0]) / 1000.0
            out.append(row)
        if len(entries) < page:
            return out
        start = "(" + as_str(entries[-1][0])


def read_metrics_file(path: str | os.PathLike) -> list[dict[str, float]]:
    """The lines of a :data:`METRICS_FILE`, oldest first (null read as NaN).

    Raises:
        OSError: unreadable; ValueError: a line is not a JSON object.
    """
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            out.append({k: math.nan if v is None else v for k, v in row.items()})
    return out


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def game_fields(record: GameRecord, **meta: Any) -> dict[str, Any]:
    """The fields of one game entry: ``record.to_dict()`` (``start_sfen``, ``moves``, ``result``,
    ``result_str``, ``reason``, ``plies``, ``opening_plies``) plus ``meta`` (the worker adds
    ``version``; the learner adds ``worker`` when it moves the game into ``games``), flat as Redis
    takes them. Read back by :func:`keisei_stream.play.records.parse_game_fields`."""
    return _flat({**record.to_dict(), **meta})


def append_game(r: redis.Redis, keys: Keys, worker_id: str, record: GameRecord, maxlen: int, **meta: Any) -> str:
    """``XADD games:{worker_id} MAXLEN ~ maxlen`` of a finished game (:func:`game_fields`) to the
    worker's own game stream, which the learner moves into ``games``
    (:meth:`keisei_stream.wire.archive.Recorder.forward`); returns the entry id."""
    return as_str(r.xadd(keys.worker_games(worker_id), game_fields(record, **meta), maxlen=maxlen, approximate=True))


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


#: Producer record field -> the accounting field its sum over the workers is
#: (:func:`read_accounting`, :func:`read_worker_accounting`).
FROM_RECORDS = {"positions": "produced_positions", "batches": "produced_batches",
                "discarded": "worker_discarded_positions", "lost_positions": "worker_lost_positions",
                "lost_batches": "worker_lost_batches"}


def read_accounting(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The run's position accounting as ints, every field of ``ACCOUNTING_FIELDS`` present (0 if
    unset): the sums over the workers of the learner's ``accounting`` hash (fields
    ``{name}:{worker}``; a run from before the per-worker fields kept plain ``{name}``: added too),
    plus the sums over the workers' producer records (:func:`read_producers`, :data:`FROM_RECORDS`):
    ``produced_positions``, ``produced_batches``, ``worker_discarded_positions`` and
    ``worker_lost_positions`` / ``worker_lost_batches`` (adds a failover lost after the server had
    acknowledged them: the workers were told of ``produced_positions + worker_lost_positions``)."""
    d = {f: 0 for f in ACCOUNTING_FIELDS}
    d.update(dict.fromkeys(("worker_discarded_positions", "worker_lost_positions", "worker_lost_batches"), 0))
    for k, v in _int_hash(r, keys.accounting).items():
        name = k.partition(":")[0]
        d[name] = d.get(name, 0) + v
    for rec in read_producers(r, keys).values():
        for field, name in FROM_RECORDS.items():
            d[name] += rec[field]
    return d


def read_worker_accounting(r: redis.Redis, keys: Keys,
                           producers: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, int]]:
    """The accounting per worker: worker id -> every field of ``ACCOUNTING_FIELDS`` (the learner's
    counts; ``produced_positions`` and ``produced_batches`` from the worker's own record) plus
    ``worker_discarded_positions``, ``worker_lost_positions``, ``worker_lost_batches`` (a
    failover's lost adds, :func:`read_accounting`) and ``unsettled_positions`` (produced and not
    yet trained, stale, rejected or dropped as a duplicate: in its stream or held by a learner, or
    lost to what its own credential did to its stream). For every worker with a record or a count.
    ``producers``: the records as :func:`read_producers` just read them (default: read here)."""
    names = (*ACCOUNTING_FIELDS, "worker_discarded_positions", "worker_lost_positions", "worker_lost_batches")
    out = _per_worker(_int_hash(r, keys.accounting), names)
    for w, rec in (read_producers(r, keys) if producers is None else producers).items():
        d = out.setdefault(w, dict.fromkeys(names, 0))
        for field, name in FROM_RECORDS.items():
            d[name] += rec[field]
    for d in out.values():
        d["unsettled_positions"] = d["produced_positions"] - sum(
            d[f"{k}_positions"] for k in ("trained", "stale", "rejected", "duplicate"))
    return out


def stream_positions(r: redis.Redis, keys: Keys, worker_id: str, page: int = 1000) -> int:
    """Positions in the entries still in worker ``worker_id``'s experience stream (the sum of their
    ``n`` fields, read with ``XRANGE`` pages of ``page``; an entry without a readable ``n`` counts
    0; a key that is not a stream counts 0)."""
    total, start = 0, "-"
    while True:
        try:
            items = r.xrange(keys.experience(worker_id), min=start, count=page)
        except ResponseError:  # WRONGTYPE
            return total
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


def stream_info(r: redis.Redis, keys: Keys, worker_ids: list[str] | None = None) -> dict[str, Any]:
    """State of the experience streams of ``worker_ids`` (default: the roster, :func:`read_roster`).

    Returns:
        ``length`` (the sum of their XLEN), ``backlog`` (= length: acknowledged entries are
        deleted, so this is the unacknowledged count), ``pending`` (delivered, not acknowledged),
        ``lag`` (the sum of XINFO GROUPS lag, never delivered; None when Redis reports nil for
        some stream after XDEL: then ``length - pending`` is the estimate in ``undelivered``),
        ``undelivered``, ``consumers`` (the most consumers of the group on one stream),
        ``streams`` (how many), ``deadletter`` (XLEN of the deadletter stream) and ``workers``:
        worker id -> ``{length, pending}``.
    """
    ids = read_roster(r, keys) if worker_ids is None else list(worker_ids)
    pipe = r.pipeline(transaction=False)
    pipe.xlen(keys.deadletter)
    for w in ids:
        pipe.xlen(keys.experience(w))
        pipe.xinfo_groups(keys.experience(w))
    res = pipe.execute(raise_on_error=False)
    dead = res[0] if isinstance(res[0], int) else 0
    length = pending = consumers = 0
    lag: int | None = 0
    per: dict[str, dict[str, int]] = {}
    for i, w in enumerate(ids):
        n, groups = res[1 + 2 * i], res[2 + 2 * i]
        n = n if isinstance(n, int) else 0
        p, g_lag = 0, 0  # no group (no stream yet): nothing undelivered
        for gi in groups if isinstance(groups, list) else []:
            g = {as_str(k): v for k, v in gi.items()}
            if as_str(g.get("name", "")) == keys.group:
                p = int(g.get("pending") or 0)
                consumers = max(consumers, int(g.get("consumers") or 0))
                g_lag = int(g["lag"]) if g.get("lag") is not None else None
        length, pending = length + n, pending + p
        lag = None if lag is None or g_lag is None else lag + g_lag
        per[w] = {"length": n, "pending": p}
    undelivered = lag if lag is not None else max(0, length - pending)
    return {"length": length, "backlog": length, "pending": pending, "lag": lag, "undelivered": undelivered,
            "consumers": consumers, "streams": len(ids), "deadletter": int(dead), "workers": per}
