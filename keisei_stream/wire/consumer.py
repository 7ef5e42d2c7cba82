"""The experience stream's consumer: a learner's reader on the ``learners`` group, and the one
place that knows the delivery state of every entry the learner holds.

An entry's states, from this learner's view (what :class:`Consumer` keeps)::

    in the stream --read--> held --take_updates--> in an update --settle--> acknowledged
         |                   |                          |                 (trained / stale counted,
         |                   +--------------------------+                  XACK + XDEL atomically)
         +--> dead-lettered / dropped as a duplicate at read (acknowledged and counted there)
         +--> lost: claimed by another learner after ``claim_idle_ms`` (forgotten here), or the
              server restarted without the run's data (another epoch: never acknowledged there)

``held`` lists the entries read and not yet in an update; ``in_flight`` maps every entry read and
not yet acknowledged (held or in an update) to its positions. Every entry carries the run's
``epoch`` it was read in and is acknowledged only into that epoch.

Group ``learners`` is created at id 0 with ``MKSTREAM``. :meth:`Consumer.read` returns, in this
order: this consumer's own pending entries (``XREADGROUP`` id 0, after a restart), entries idle
for more than ``claim_idle_ms`` in dead consumers' pending lists (``XAUTOCLAIM``, re-scanned every
``claim_idle_ms / 2``), then new entries (``XREADGROUP >`` with ``BLOCK``). Bad entries go to the
capped ``deadletter`` stream and duplicates (same ``batch_id``) are dropped; both are acknowledged
and deleted at once and counted. Good entries are acknowledged and deleted only by
:meth:`Consumer.ack`, after the update that used them (at-least-once delivery).

Takes a ``redis.Redis`` made by :func:`keisei_stream.wire.client.connect` (bytes replies;
socket timeout above every ``BLOCK``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import redis
from redis.exceptions import ResponseError

from . import retry
from .atomic import EpochChanged, create_group, run_atomic, write_small
from .client import as_str
from keisei_stream.experience import ExperienceBatch

from .codec import decode_entry, entry_positions
from .keys import Keys
from .errors import BadEntry
from .status import append_losses, read_accounting
from .weights import read_latest_info

log = logging.getLogger("keisei.learner")

#: Deadletter entries keep at most this many bytes of each raw field, and at most 16 fields.
DEADLETTER_FIELD_BYTES = 4096
#: Batch ids remembered in Redis (``trained_batches``) to drop replays across learner restarts:
#: about 60 bytes each, so at most ~6 MB; covers the last 100,000 batches (~10^8 positions).
TRAINED_BATCHES_KEPT = 100_000


@dataclass
class Delivered:
    """One good entry handed to the learner: its stream id, the decoded batch, and the run's epoch
    it was read in (:attr:`Consumer.epoch`): it may be acknowledged only into that epoch, never
    into a server that restarted without the run's data since."""

    entry_id: str
    batch: ExperienceBatch
    epoch: str | None = None


def ensure_group(r: redis.Redis, keys: Keys) -> None:
    """Create the ``learners`` group on the experience stream at id 0 (MKSTREAM); idempotent, and
    also on a full server (:func:`keisei_stream.wire.atomic.create_group`)."""
    create_group(r, keys, keys.experience, keys.group, "the consumer group")


class Consumer:
    """A learner's reader on the ``learners`` group.

    Args:
        r: client whose socket timeout exceeds ``block_ms``.
        keys: the run's keys.
        consumer_name: unique and stable per learner (a restarted learner that reuses it gets its
            own pending entries back first).
        max_plies: ``env.max_plies`` for validation.
        block_ms: XREADGROUP BLOCK for new entries.
        count: entries per read.
        claim_idle_ms: pending entries idle longer than this in other consumers are claimed.
        deadletter_maxlen: approximate cap of the deadletter stream.
        check_legal: full replay validation (see :func:`keisei_stream.wire.codec.decode_entry`).
        dedup_window: how many recent batch ids are remembered for duplicate detection.
        wait: ``(replicas, ms)``: every acknowledgement waits until that many replicas hold it
            (``WAIT``, :func:`keisei_stream.wire.atomic.run_atomic`), so a failover keeps it.

    Attributes:
        in_flight: ids delivered by this consumer and not yet acknowledged.
        stats: local counters (``good``, ``bad``, ``duplicate``, ``claimed``, ``own_pending``).
    """

    def __init__(self, r: redis.Redis, keys: Keys, consumer_name: str, *, max_plies: int, block_ms: int = 1000,
                 count: int = 16, claim_idle_ms: int = 60_000, deadletter_maxlen: int = 10_000,
                 check_legal: bool = True, dedup_window: int = 100_000, wait: tuple[int, int] | None = None):
        self.r = r
        self.keys = keys
        self.name = consumer_name
        self.max_plies = int(max_plies)
        self.block_ms = int(block_ms)
        self.count = int(count)
        self.claim_idle_ms = int(claim_idle_ms)
        self.deadletter_maxlen = int(deadletter_maxlen)
        self.check_legal = check_legal
        self.dedup_window = int(dedup_window)
        self.wait = wait
        self.in_flight: dict[str, int] = {}  # entry id -> positions
        self._seen: dict[str, str] = {}  # batch_id -> entry id (insertion ordered, bounded)
        self._own_cursor: str | None = "0"  # None once our own pending list was re-read
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_keep_alive = 0.0
        self.stats = {"good": 0, "bad": 0, "duplicate": 0, "claimed": 0, "own_pending": 0, "lost_to_claims": 0}
        self.decode_s = 0.0  # seconds spent decoding and validating entries (a time share of the learner)
        self.newest_version: int | None = None  # entries claiming a newer model version are rejected
        self.epoch: str | None = None  # the run's epoch this consumer acknowledges into (claim_epoch)
        self.held: list[Delivered] = []  # read, not yet in an update
        self.backlog_full = False  # the last receive() read nothing new while the stream was at max_backlog
        self.epoch_lost = False  # an epoch-checked write was refused: the server lost the run's data
        self._outages_seen = retry.OUTAGES.outages
        ensure_group(r, keys)

    def reset(self) -> None:
        """Forget what this consumer handed out: the server lost the stream (a restart without
        persistence), so ids in flight mean nothing there. Re-reads own pending entries next.
        Held entries stay held (their data is in memory; they keep their old epoch)."""
        self.in_flight.clear()
        self._own_cursor = "0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    # -- the delivery states -----------------------------------------------------------------
    def claim_epoch(self) -> str:
        """The run's epoch on this server: the existing one, or a new random one if the key is
        missing (the run's data is new here). Entries read from now on are acknowledged into it."""
        if self.r.get(self.keys.epoch) is None:  # (also on a full server: write_small)
            write_small(self.r, self.keys, ("SET", self.keys.epoch, secrets.token_hex(8), "NX"), "the run's epoch")
        self.epoch = as_str(self.r.get(self.keys.epoch))
        self.epoch_lost = False
        return self.epoch

    def receive(self, max_backlog: int, block_ms: int | None = None) -> int:
        """Read the next entries into :attr:`held` (see :meth:`read`); returns how many.

        Held entries that another learner claimed meanwhile (this one stalled past
        ``claim_idle_ms``) are dropped from :attr:`held`. Sets :attr:`backlog_full` when nothing
        new came while the stream holds ``max_backlog`` entries: workers add only below that
        limit, so no more data can come until the learner trains what it holds. A dead-letter
        write refused for a changed epoch sets :attr:`epoch_lost` (see :meth:`check_server`).
        """
        try:
            delivered = self.read(block_ms)
        except EpochChanged:  # a rejected entry could not be counted: the server lost the run's data
            self.epoch_lost, delivered = True, []
        self.held = [d for d in self.held if d.entry_id in self.in_flight] + delivered
        self.backlog_full = bool(self.held) and not delivered and self.r.xlen(self.keys.experience) >= max_backlog
        return len(delivered)

    def held_positions(self) -> int:
        """Positions in :attr:`held`."""
        return sum(d.batch.num_positions for d in self.held)

    def take_updates(self, target: int, count: int | None = None, flush: bool = False) -> list[list[Delivered]]:
        """Take entries out of :attr:`held` into updates of about ``target`` positions
        (:func:`group_updates`): the first ``count`` full ones (all full ones when None), or with
        ``flush`` every held entry (the remainder as one smaller update). The rest stays held."""
        groups, rest = group_updates(self.held, target)
        if flush:
            self.held = []
            return groups + ([rest] if rest else [])
        count = len(groups) if count is None else count
        self.held = [d for g in groups[count:] for d in g] + rest
        return groups[:count]

    def settle(self, entries: list[Delivered], kept: Sequence[int]) -> None:
        """Acknowledge the entries of an update: ``kept[i]`` of entry ``i``'s positions were
        trained, the rest were stale (:meth:`ack`). Entries read in another epoch (the server
        has lost the run's data since) are never acknowledged into this one; a refusal for a
        changed epoch sets :attr:`epoch_lost`."""
        live = [(d, int(k)) for d, k in zip(entries, kept) if d.epoch == self.epoch]
        if not live:
            return
        try:
            self.ack([d for d, _ in live], trained_positions=[k for _, k in live],
                     stale_positions=[d.batch.num_positions - k for d, k in live])
        except EpochChanged:  # the server restarted without our data while we trained on it
            self.epoch_lost = True

    def check_server(self) -> bool:
        """After an outage (or a write refused for its epoch), compare the run's ``epoch`` key with
        ours: True when it is missing or changed, i.e. the server restarted without the run's data
        (then call :meth:`recover`)."""
        if retry.OUTAGES.outages == self._outages_seen and not self.epoch_lost:
            return False
        self._outages_seen = retry.OUTAGES.outages
        epoch = self.r.get(self.keys.epoch)
        self.epoch_lost = epoch is None or as_str(epoch) != self.epoch
        return self.epoch_lost

    def recover(self, accounting_before: Mapping[str, int], **fields: Any) -> dict[str, Any]:
        """The server lost the run's data: claim a new epoch, forget the ids in flight, recreate the
        group, and record the loss in the ``losses`` stream (old/new epoch, what was held and is
        kept, the unread positions lost by ``accounting_before``, plus ``fields``).

        Returns:
            The ``losses`` entry's fields.
        """
        old_epoch, found = self.epoch, self.r.get(self.keys.epoch)
        held, held_positions = len(self.in_flight), sum(self.in_flight.values())
        self.claim_epoch()
        self.reset()
        ensure_group(self.r, self.keys)
        record = {"time": round(time.time(), 3), "detected_by": self.name, "old_epoch": old_epoch or "",
                  "new_epoch": self.epoch, "found_epoch": as_str(found) if found is not None else "",
                  "held_entries_kept": held, "held_positions_kept": held_positions,
                  "unread_positions_lost": max(0, unsettled(accounting_before) - held_positions),
                  "accounting_before": json.dumps(dict(accounting_before)), **fields}
        retry.best_effort("losses entry", append_losses, self.r, self.keys, record)
        return record

    def record_failover(self, accounting_before: Mapping[str, int], version_held: int) -> int:
        """After an outage with the run's epoch intact, see what the server lacks: it may be a
        promoted replica (a Sentinel failover) or one restarted from its files, holding the run's
        data up to some point before the outage. When it holds an older weights version than
        ``version_held`` (the publisher's), or fewer produced, produced-batch or trained positions
        than ``accounting_before`` (the accounting as last read before the outage), one ``losses``
        entry (``kind`` ``failover``) records it: the ``*_missing`` counts (positions whose adds
        the old primary acknowledged and never replicated, as far as that last read saw them: a
        lower bound), the versions, both accountings.

        Returns:
            The newest version the server holds (0: none); below ``version_held`` the caller
            publishes again.
        """
        info = read_latest_info(self.r, self.keys)
        found = 0 if info is None else info["version"]
        now = read_accounting(self.r, self.keys)
        missing = {k: accounting_before[k] - now.get(k, 0) for k in ("produced_positions", "produced_batches",
                                                                      "trained_positions")
                   if accounting_before.get(k, 0) > now.get(k, 0)}
        if missing or found < version_held:
            log.error("Redis came back without some of the run's newest writes (a failover or a restart from its "
                      "files): weights v%d found, v%d held; missing %s", found, version_held, missing)
            retry.best_effort("losses entry", append_losses, self.r, self.keys, {
                "time": round(time.time(), 3), "kind": "failover", "detected_by": self.name, "epoch": self.epoch or "",
                "version_held": version_held, "version_found": found, **{f"{k}_missing": v for k, v in missing.items()},
                "accounting_before": json.dumps(dict(accounting_before)), "accounting_found": json.dumps(now)})
        return found

    # -- reading -----------------------------------------------------------------------------
    def read(self, block_ms: int | None = None) -> list[Delivered]:
        """The next good entries (possibly none), in the order described in the module doc.

        Bad entries and duplicates met on the way are dead-lettered / dropped and acknowledged
        here. Blocks at most ``block_ms`` (default: the constructor's) when nothing is pending.

        A missing group (``NOGROUP``: the server restarted without the run's data) is created
        again and the read returns nothing; the learner then records what was lost.

        Raises:
            redis.ConnectionError / redis.TimeoutError: only when a stop was requested during an
                outage (otherwise the client waits for the server; nothing is lost).
        """
        try:
            return self._read(block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.reset()
            ensure_group(self.r, self.keys)
            return []

    def _read(self, block_ms: int | None) -> list[Delivered]:
        self.keep_alive()
        if self._own_cursor is not None:
            resp = self.r.xreadgroup(self.keys.group, self.name, {self.keys.experience: self._own_cursor},
                                     count=self.count)
            entries = _stream_entries(resp)
            if entries:
                self._own_cursor = as_str(entries[-1][0])
                self.stats["own_pending"] += len(entries)
                return self._process(entries)
            self._own_cursor = None
        now = time.monotonic()
        if now >= self._next_claim:
            claimed = self._autoclaim()
            if claimed is not None:
                return claimed
            self._next_claim = now + self.claim_idle_ms / 2000.0
        resp = self.r.xreadgroup(self.keys.group, self.name, {self.keys.experience: ">"}, count=self.count,
                                 block=self.block_ms if block_ms is None else int(block_ms))
        return self._process(_stream_entries(resp))

    def _autoclaim(self) -> list[Delivered] | None:
        """One XAUTOCLAIM page; None when the scan is complete (cursor back at 0-0)."""
        resp = self.r.xautoclaim(self.keys.experience, self.keys.group, self.name, min_idle_time=self.claim_idle_ms,
                                 start_id=self._claim_cursor, count=self.count)
        cursor = as_str(resp[0])
        entries = [e for e in resp[1] if e is not None and e[1] and as_str(e[0]) not in self.in_flight]
        self._claim_cursor = cursor
        if entries:
            self.stats["claimed"] += len(entries)
            return self._process(entries)
        if cursor in ("0-0", "0"):
            self._claim_cursor = "0-0"
            return None
        return []  # more pages to scan; come back next call

    def _process(self, entries: list[tuple[Any, Any]]) -> list[Delivered]:
        good: list[Delivered] = []
        for raw_id, fields in entries:
            entry_id = as_str(raw_id)
            if entry_id in self.in_flight:
                continue  # already handed out by this consumer (re-delivery of our own pending)
            if not fields:  # deleted while pending (redis-py gives None or {}); XADD needs >= 1 field
                self.r.xack(self.keys.experience, self.keys.group, entry_id)
                continue
            t0 = time.monotonic()
            try:
                batch = decode_entry(fields, max_plies=self.max_plies, check_legal=self.check_legal,
                                     max_version=self.newest_version)
            except BadEntry as exc:
                self._reject(entry_id, fields, exc)
                continue
            finally:
                self.decode_s += time.monotonic() - t0
            if (batch.batch_id in self._seen and self._seen[batch.batch_id] != entry_id) or \
                    self.r.zscore(self.keys.trained_batches, batch.batch_id) is not None:
                self._drop_duplicate(entry_id, batch)  # a client retry, or a replay of a trained batch
                continue
            self._remember(batch.batch_id, entry_id)
            self.in_flight[entry_id] = batch.num_positions
            self.stats["good"] += 1
            good.append(Delivered(entry_id, batch, self.epoch))
        return good

    def _remember(self, batch_id: str, entry_id: str) -> None:
        self._seen[batch_id] = entry_id
        while len(self._seen) > self.dedup_window:
            self._seen.pop(next(iter(self._seen)))

    def _reject(self, entry_id: str, fields: Mapping[Any, Any], exc: BadEntry) -> None:
        """Dead-letter the entry with its reason (:func:`deadletter_record`); count it, and the
        positions actually decoded from it (``exc.positions``, never the entry's own claim ``n``)."""
        self._discard(entry_id, "rejected", exc.positions, deadletter=deadletter_record(entry_id, fields, exc, self.name))
        self.stats["bad"] += 1

    def _drop_duplicate(self, entry_id: str, batch: ExperienceBatch) -> None:
        self._discard(entry_id, "duplicate", batch.num_positions)
        self.stats["duplicate"] += 1

    def _discard(self, entry_id: str, what: str, positions: int, deadletter: dict | None = None) -> None:
        """Atomically: (dead-letter,) acknowledge and delete the entry, and count it in
        ``{what}_entries`` / ``{what}_positions``."""
        k = self.keys
        cmds: list[tuple] = []
        if deadletter is not None:
            flat = [x for kv in deadletter.items() for x in kv]
            cmds.append(("XADD", k.deadletter, "MAXLEN", "~", self.deadletter_maxlen, "*", *flat))
        cmds += [("XACK", k.experience, k.group, entry_id), ("XDEL", k.experience, entry_id),
                 ("HINCRBY", k.accounting, f"{what}_entries", 1),
                 ("HINCRBY", k.accounting, f"{what}_positions", int(positions))]
        run_atomic(self.r, self.keys, cmds, self.epoch)

    # -- acknowledging -----------------------------------------------------------------------
    def ack(self, entries: Iterable[Delivered | str], trained_positions: int | Sequence[int],
            stale_positions: int | Sequence[int]) -> None:
        """Acknowledge and delete ``entries`` after the update that used them, atomically (also
        when Redis is at maxmemory, never into a server that lost the run's data: see
        :func:`keisei_stream.wire.atomic.run_atomic`).

        Counts each entry's trained and stale positions in the accounting only if this
        acknowledgement is the one that removed it from the group's pending entries: an entry two
        learners held (one stalled past ``claim_idle_ms`` and another claimed it) is counted once
        (the second acknowledgement increments ``double_acks``). Adds the batch ids to
        ``trained_batches`` (the newest :data:`TRAINED_BATCHES_KEPT`), so a replay of a trained
        batch is dropped even by a restarted learner.

        Args:
            entries: what the update used (``Delivered``, or bare ids: then counted as given).
            trained_positions, stale_positions: per entry (sequences, in ``entries`` order), or
                totals, assigned to the entries in order (trained first).
        """
        k = self.keys
        entries = list(entries)
        ids = [e.entry_id if isinstance(e, Delivered) else str(e) for e in entries]
        trained, stale = _per_entry(entries, trained_positions, stale_positions)
        now_ms = int(time.time() * 1000)
        batch_ids = [x for e in entries if isinstance(e, Delivered) for x in (now_ms, e.batch.batch_id)]
        cmds: list[tuple] = [("ACK_COUNTED", k.experience, k.group, k.accounting, i, t, s)
                             for i, t, s in zip(ids, trained, stale)]
        if batch_ids:
            cmds += [("ZADD", k.trained_batches, *batch_ids),
                     ("ZREMRANGEBYRANK", k.trained_batches, 0, -(TRAINED_BATCHES_KEPT + 1))]
        if cmds:
            run_atomic(self.r, self.keys, cmds, self.epoch, self.wait)
        for i in ids:
            self.in_flight.pop(i, None)

    def keep_alive(self, force: bool = False) -> None:
        """Reset the idle time of the entries this consumer holds (``XCLAIM ... JUSTID`` of the
        ones it still owns, in one script, at most every ``claim_idle_ms / 4``), so that no other
        learner claims an entry only because this one held it long (waiting to fill an update).
        Entries another consumer claimed meanwhile (this one stalled past ``claim_idle_ms``) are
        forgotten: they are no longer in :attr:`in_flight`, and the learner drops them."""
        now = time.monotonic()
        if not self.in_flight or (not force and now < self._next_keep_alive):
            return
        self._next_keep_alive = now + self.claim_idle_ms / 4000.0
        ids = list(self.in_flight)
        kept = set()
        for s in range(0, len(ids), 500):
            kept |= {as_str(x) for x in self.r.eval(_KEEP_ALIVE_LUA, 1, self.keys.experience, self.keys.group,
                                                     self.name, *ids[s:s + 500])}
        for i in ids:
            if i not in kept:
                self.in_flight.pop(i, None)
                self.stats["lost_to_claims"] += 1


def group_updates(held: list[Delivered], target: int) -> tuple[list[list[Delivered]], list[Delivered]]:
    """``(groups, rest)``: ``held`` (in arrival order) cut into groups of at least ``target``
    positions, each as small as whole entries allow, and what is left over."""
    groups, group, n = [], [], 0
    for d in held:
        group.append(d)
        n += d.batch.num_positions
        if n >= target:
            groups.append(group)
            group, n = [], 0
    return groups, group


def unsettled(accounting: Mapping[str, int]) -> int:
    """Positions produced and not yet trained, stale, rejected or dropped as duplicates: what is in
    the stream or held by a learner (the accounting identity's difference)."""
    a = accounting
    return (a.get("produced_positions", 0) - a.get("trained_positions", 0) - a.get("stale_positions", 0)
            - a.get("rejected_positions", 0) - a.get("duplicate_positions", 0))


def deadletter_record(entry_id: str, fields: Mapping[Any, Any], exc: BadEntry, consumer: str) -> dict[Any, Any]:
    """The ``deadletter`` entry of a rejected entry: the reason, the entry id, the consumer, the
    positions decoded and claimed, the worker, and the raw fields (at most 16, each cut at
    :data:`DEADLETTER_FIELD_BYTES`)."""
    dl: dict[Any, Any] = {"reason": exc.reason, "entry_id": entry_id, "consumer": consumer,
                          "decoded_positions": exc.positions, "claimed_positions": entry_positions(fields)}
    raw_total = 0
    for i, (k, v) in enumerate(fields.items()):
        if i >= 16:
            dl["raw_truncated_fields"] = len(fields) - 16
            break
        kb = k if isinstance(k, bytes) else str(k).encode()
        vb = v if isinstance(v, bytes) else str(v).encode()
        raw_total += len(vb)
        if kb == b"w":
            dl["worker"] = vb[:200]
        dl[b"raw:" + kb[:64]] = vb[:DEADLETTER_FIELD_BYTES]
    dl["raw_bytes"] = raw_total
    return dl


def _per_entry(entries: list, trained: int | Sequence[int], stale: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Per-entry trained and stale positions: given per entry, or totals assigned in order."""
    if not isinstance(trained, int) and not isinstance(stale, int):
        return [int(x) for x in trained], [int(x) for x in stale]
    t_left, s_left = int(trained), int(stale)
    t_out, s_out = [], []
    for e in entries:
        n = e.batch.num_positions if isinstance(e, Delivered) else t_left + s_left
        t = min(n, t_left)
        s_ = min(n - t, s_left)
        t_left, s_left = t_left - t, s_left - s_
        t_out.append(t)
        s_out.append(s_)
    if t_out:  # what could not be assigned (counts above the entries' positions) stays visible
        t_out[-1] += t_left
        s_out[-1] += s_left
    return t_out, s_out


# Reset the idle time of ARGV[3..] in group ARGV[1] for consumer ARGV[2], only for the entries it
# still owns; returns those ids (the others were claimed by another consumer).
_KEEP_ALIVE_LUA = """
local kept = {}
for j = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[j], ARGV[j], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[j], 'JUSTID')
    kept[#kept + 1] = ARGV[j]
  end
end
return kept
"""


def _stream_entries(resp: Any) -> list[tuple[Any, Any]]:
    """Flatten an XREADGROUP reply (RESP2 list or RESP3 dict) for one stream into (id, fields)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        out: list[tuple[Any, Any]] = []
        for v in resp.values():
            for item in (v[0] if v and isinstance(v[0], list) and v and isinstance(v[0][0], (list, tuple)) else v):
                out.append((item[0], item[1]))
        return out
    out = []
    for _stream, items in resp:
        for item in items:
            out.append((item[0], item[1]))
    return out
