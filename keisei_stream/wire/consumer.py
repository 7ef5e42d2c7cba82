"""The experience streams' consumer: a learner's reader on the ``learners`` group of every active
worker's stream, and the one place that knows the delivery state of every entry the learner holds,
the workers' credit, and the games in flight.

An entry's states, from this learner's view (what :class:`Consumer` keeps)::

    in a worker's stream --read--> held --take_updates--> in an update --settle--> acknowledged
         |                          |                          |           (trained / stale counted,
         |                          +--------------------------+            XACK + XDEL atomically)
         +--> dead-lettered / dropped as a duplicate at read (acknowledged and counted there)
         +--> lost: claimed by another learner after ``claim_idle_ms`` (forgotten here), or the
              server restarted without the run's data (another epoch: never acknowledged there)

``held`` lists the entries read and not yet in an update; ``in_flight`` maps every entry read and
not yet acknowledged (held or in an update), by ``(worker, entry id)``, to its positions. Every
entry carries the run's ``epoch`` it was read in and is acknowledged only into that epoch.

**Streams.** Each worker adds to its own stream ``experience:{id}`` (:mod:`keisei_stream.wire.producer`),
and the stream, not the entry, says which worker wrote it: an entry whose ``w`` or ``batch_id``
names another worker is refused, and the accounting is kept per worker. The workers read are the
``roster`` (set by whoever creates the workers' users), read again every ``refresh_s``; group
``learners`` is created at id 0 with ``MKSTREAM`` on each. :meth:`Consumer.read` returns, in this
order: this consumer's own pending entries (``XREADGROUP`` id 0 over the streams, after a
restart), entries idle for more than ``claim_idle_ms`` in dead consumers' pending lists
(``XAUTOCLAIM``, stream by stream, re-scanned every ``claim_idle_ms / 2``), then new entries (one
``XREADGROUP >`` over every stream under its quota, with ``BLOCK``). Bad entries go to the capped
``deadletter`` stream and duplicates (same ``batch_id``) are dropped; both are acknowledged and
deleted at once and counted. Good entries are acknowledged and deleted only by
:meth:`Consumer.ack`, after the update that used them (at-least-once delivery).

**Credit (the backpressure rule).** The run's window is ``window`` entries (``stream.max_backlog``):
every ``refresh_s`` the learner gives each roster worker a credit of ``ceil(window / L)``
entries, ``L`` the number of roster workers whose heartbeat is alive (all of them when none is),
and publishes it in the ``credit`` hash. A worker adds only while its stream holds fewer entries
than its credit; what it holds there is at most its credit, so all the streams together hold
about ``window`` entries (at most ``window + L - 1``, plus the credit of a worker that just came
back). The learner reads a stream only while it holds fewer than its credit of that stream's
entries (its quota; one read takes at most ``count`` more): a worker that ignores its credit
only lengthens its own stream, is read no faster than the others, and is counted (``overruns``,
``overrun_entries`` in the ``confined`` hash) each time the learner finds its stream longer than
its credit. When nothing new arrives while the learner holds entries, and every live worker
either holds its credit or sent nothing for ``stall_s`` seconds, no more can come before the
learner trains what it holds: :attr:`Consumer.backlog_full` (the remainder is trained as a
smaller update).

**A worker's own stream attacked with its own credential.** ``MAXLEN`` trims only its own unread
entries (they show as its unsettled positions); garbage is dead-lettered and counted as its
rejected positions; an entry whose id lies in the future (the largest id exhausts the stream: no
``XADD *`` works on it any more) is counted (``future_ids``), and once the learner has read the
stream empty and settled everything of it, it deletes and recreates the stream (``stream_resets``)
so that the worker goes on. Nothing of it reaches another worker's stream or the learner's
reading of the others.

**Games in flight.** Entries are validated with a :class:`~keisei_stream.wire.replay.GameBook`
(:func:`keisei_stream.wire.replay.replay_check`): each game's segments are checked against the
game's earlier ones; what the book learns from an entry is committed only once the entry is kept.

Takes a ``redis.Redis`` made by :func:`keisei_stream.wire.client.connect` (bytes replies;
socket timeout above every ``BLOCK``).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import redis
from redis.exceptions import ResponseError

from . import retry
from .atomic import EpochChanged, EpochWatch, create_group, run_atomic, write_small
from .client import as_str
from keisei_stream.experience import ExperienceBatch

from .codec import decode_entry, entry_positions
from .keys import Keys
from .errors import BadEntry
from .replay import GAME_BOOK_POSITIONS, GameBook
from .status import alive_workers, append_losses, read_accounting, read_roster, register_workers
from .weights import read_latest_info

log = logging.getLogger("keisei.learner")

#: Deadletter entries keep at most this many bytes of each raw field, and at most 16 fields.
DEADLETTER_FIELD_BYTES = 4096
#: Batch ids remembered in Redis (``trained_batches``) to drop replays across learner restarts:
#: about 60 bytes each, so at most ~6 MB; covers the last 100,000 batches (~10^8 positions).
TRAINED_BATCHES_KEPT = 100_000
#: An entry id this far (ms) ahead of the learner's clock is "in the future": no honest producer
#: makes one (ids come from the server's clock); the largest one exhausts the stream's ids.
FUTURE_ID_MS = 24 * 3600 * 1000
#: Seconds without an entry after which a live worker below its credit no longer holds the
#: learner's partial update back (:attr:`Consumer.backlog_full`).
STALL_S = 30.0

#: Signature of the collective through which several learner ranks agree (element-wise, ``op`` =
#: ``"max"``): :func:`keisei_stream.rl.distributed.all_reduce`.
Agree = Callable[[list[float], str], list[float]]


@dataclass
class Delivered:
    """One good entry handed to the learner: the worker whose stream it came from, its stream id,
    the decoded batch, and the run's epoch it was read in (:attr:`Consumer.epoch`): it may be
    acknowledged only into that epoch, never into a server that restarted without the run's data
    since."""

    worker: str
    entry_id: str
    batch: ExperienceBatch
    epoch: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """``(worker, entry id)``: an entry id alone is unique only within one stream."""
        return self.worker, self.entry_id


def ensure_group(r: redis.Redis, keys: Keys, worker_id: str) -> None:
    """Create the ``learners`` group on worker ``worker_id``'s experience stream at id 0
    (MKSTREAM); idempotent, and also on a full server (:func:`keisei_stream.wire.atomic.create_group`)."""
    create_group(r, keys, keys.experience(worker_id), keys.group, f"the consumer group on {worker_id}'s stream")


class Consumer:
    """A learner's reader on the ``learners`` group of every roster worker's stream.

    Args:
        r: client whose socket timeout exceeds ``block_ms``.
        keys: the run's keys.
        consumer_name: unique and stable per learner (a restarted learner that reuses it gets its
            own pending entries back first).
        max_plies: ``env.max_plies`` for validation.
        window: ``stream.max_backlog``, the run's window in entries, shared by the live workers
            as their credit (module doc).
        block_ms: XREADGROUP BLOCK for new entries.
        count: entries per read and stream.
        claim_idle_ms: pending entries idle longer than this in other consumers are claimed.
        deadletter_maxlen: approximate cap of the deadletter stream.
        check_legal: full replay validation (see :func:`keisei_stream.wire.codec.decode_entry`).
        dedup_window: how many recent batch ids are remembered for duplicate detection.
        refresh_s: seconds between readings of the roster and the heartbeats (credit, overruns,
            stream resets).
        publishes: this consumer writes the ``credit`` and ``confined`` hashes (one learner rank).
        game_positions: bound of the :class:`~keisei_stream.wire.replay.GameBook`.
        stall_s: :data:`STALL_S`.
        wait: ``(replicas, ms)``: every acknowledgement waits until that many replicas hold it
            (``WAIT``, :func:`keisei_stream.wire.atomic.run_atomic`), so a failover keeps it.

    Attributes:
        workers: the roster as last read. live: those whose heartbeat was alive then. known:
            every worker ever on the roster here (what :meth:`recover` puts back).
        credit: worker -> its credit (entries) as last computed.
        in_flight: ``(worker, entry id)`` -> positions, delivered by this consumer and not yet
            acknowledged.
        games: the games in flight (:class:`~keisei_stream.wire.replay.GameBook`).
        stats: local counters (``good``, ``bad``, ``duplicate``, ``claimed``, ``own_pending``,
            ``lost_to_claims``, ``overruns``, ``future_ids``, ``stream_resets``).
    """

    def __init__(self, r: redis.Redis, keys: Keys, consumer_name: str, *, max_plies: int, window: int = 64,
                 block_ms: int = 1000, count: int = 16, claim_idle_ms: int = 60_000, deadletter_maxlen: int = 10_000,
                 check_legal: bool = True, dedup_window: int = 100_000, refresh_s: float = 2.0,
                 publishes: bool = True, game_positions: int = GAME_BOOK_POSITIONS, stall_s: float = STALL_S,
                 wait: tuple[int, int] | None = None):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.r = r
        self.keys = keys
        self.name = consumer_name
        self.max_plies = int(max_plies)
        self.window = int(window)
        self.block_ms = int(block_ms)
        self.count = int(count)
        self.claim_idle_ms = int(claim_idle_ms)
        self.deadletter_maxlen = int(deadletter_maxlen)
        self.check_legal = check_legal
        self.dedup_window = int(dedup_window)
        self.refresh_s = float(refresh_s)
        self.publishes = publishes
        self.stall_s = float(stall_s)
        self.wait = wait
        self.games = GameBook(game_positions)
        self.workers: list[str] = []
        self.known: set[str] = set()  # every worker ever on the roster here (the roster only grows)
        self.live: set[str] = set()
        self.credit: dict[str, int] = {}
        self.seen_lengths: dict[str, int] = {}  # worker -> its stream's XLEN at the last refresh (publishing)
        self._granted: dict[str, int] = {}  # the larger of the last two credits (what a worker may hold)
        self.in_flight: dict[tuple[str, str], int] = {}
        self._seen: dict[str, tuple[str, str]] = {}  # batch_id -> (worker, entry id), insertion ordered, bounded
        self._own_cursor: dict[str, str] = {}  # worker -> cursor of its own pending entries still to re-read
        self._claim_queue: list[str] = []  # workers whose pending entries the current XAUTOCLAIM scan has left
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_keep_alive = 0.0
        self._next_refresh = 0.0
        self._last_arrival: dict[str, float] = {}  # worker -> monotonic time of its last delivered entry
        self._reset_due: set[str] = set()
        self._confined_sent: Counter[tuple[str, str]] = Counter()
        self.stats = Counter({k: 0 for k in ("good", "bad", "duplicate", "claimed", "own_pending", "lost_to_claims",
                                             "overruns", "future_ids", "stream_resets")})
        self.decode_s = 0.0  # seconds spent decoding and validating entries (a time share of the learner)
        self.newest_version: int | None = None  # entries claiming a newer model version are rejected
        self.epoch: str | None = None  # the run's epoch this consumer acknowledges into (claim_epoch)
        self.held: list[Delivered] = []  # read, not yet in an update
        self.backlog_full = False  # the last receive() read nothing new and nothing more can come (module doc)
        self.epoch_lost = False  # an epoch-checked write was refused: the server lost the run's data
        self._watch = EpochWatch()
        self.refresh(force=True)

    # -- the roster, credit and confinement --------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Every ``refresh_s`` (or with ``force``): read the roster (a new worker's stream gets
        its group), the workers' heartbeats and stream lengths; compute and (``publishes``)
        publish the credit; count overruns; reset the streams whose ids went to the future and
        that are read empty (module doc); send the game book's counts to ``confined``."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_s
        roster = read_roster(self.r, self.keys)
        for w in roster:
            if w not in self.credit:
                ensure_group(self.r, self.keys, w)
                self._own_cursor.setdefault(w, "0")
                self._last_arrival.setdefault(w, now)
        self.workers = roster
        self.known.update(roster)
        self.live = alive_workers(self.r, self.keys, roster)
        share = math.ceil(self.window / max(1, len(self.live) or len(roster)))
        self._granted = {w: max(share, self.credit.get(w, share)) for w in roster}
        self.credit = {w: share for w in roster}
        for w in sorted(self._reset_due):
            self._reset_stream(w)
        cmds: list[tuple] = []
        if self.publishes:  # (one learner rank counts and publishes)
            self.seen_lengths = self.lengths(roster)
            for w, n in self.seen_lengths.items():
                if n > self._granted[w]:
                    self.stats["overruns"] += 1
                    cmds += [("HINCRBY", self.keys.confined, f"overruns:{w}", 1),
                             ("HSET", self.keys.confined, f"overrun_entries:{w}", n - self._granted[w])]
            for w, counts in self.games.counts.items():
                for name in ("unproven_endings", "repetition_clamped"):
                    new = counts[name] - self._confined_sent[(w, name)]
                    if new > 0:
                        cmds.append(("HINCRBY", self.keys.confined, f"{name}:{w}", new))
                        self._confined_sent[(w, name)] = counts[name]
            credit = [x for w in roster for x in (w, share)]
            cmds = [("DEL", self.keys.credit), *([("HSET", self.keys.credit, *credit)] if credit else []), *cmds]
        if cmds:
            try:
                run_atomic(self.r, self.keys, cmds, self.epoch)
            except EpochChanged:
                self.epoch_lost = True
            except ResponseError as exc:
                if not retry.is_oom(exc):
                    raise

    def lengths(self, workers: Sequence[str] | None = None) -> dict[str, int]:
        """``XLEN`` of each worker's stream (default: the roster), one pipelined round trip; a
        key that is not a stream counts 0."""
        ws = list(self.workers if workers is None else workers)
        if not ws:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for w in ws:
            pipe.xlen(self.keys.experience(w))
        return {w: n if isinstance(n, int) else 0 for w, n in zip(ws, pipe.execute(raise_on_error=False))}

    def backlog(self) -> int:
        """Entries in all the roster's streams (unacknowledged: delivered or not), read now (one
        pipelined round trip of ``XLEN`` per worker)."""
        return sum(self.lengths().values())

    @property
    def backlog_seen(self) -> int:
        """:meth:`backlog` as the last :meth:`refresh` read it (at most ``refresh_s`` old; 0 for a
        consumer that does not publish): what the learner reports after each update without
        reading every worker's stream again."""
        return sum(self.seen_lengths.values())

    def _reset_stream(self, worker: str) -> None:
        """Delete and recreate ``worker``'s stream (group included) once nothing of it is in flight
        here, it is empty and nothing of it is pending in the group (one script); then the worker
        can add again after its ids were exhausted."""
        if any(w == worker for w, _ in self.in_flight):
            return
        if int(self.r.eval(_RESET_STREAM_LUA, 1, self.keys.experience(worker), self.keys.group)) != 1:
            return
        self._reset_due.discard(worker)
        self.games.forget_worker(worker)
        self._own_cursor.pop(worker, None)
        self.stats["stream_resets"] += 1
        retry.best_effort("confined count", self.r.hincrby, self.keys.confined, f"stream_resets:{worker}", 1)

    # -- the delivery states -----------------------------------------------------------------
    def claim_epoch(self) -> str:
        """The run's epoch on this server: the existing one, or a new random one if the key is
        missing (the run's data is new here). Entries read from now on are acknowledged into it."""
        if self.r.get(self.keys.epoch) is None:  # (also on a full server: write_small)
            write_small(self.r, self.keys, ("SET", self.keys.epoch, secrets.token_hex(8), "NX"), "the run's epoch")
        self.epoch = self._watch.epoch = as_str(self.r.get(self.keys.epoch))
        self.epoch_lost = False
        return self.epoch

    def published(self, version: int) -> None:
        """The learner published ``version``: entries claiming a newer model version are hostile."""
        self.newest_version = int(version)

    def epoch_refused(self) -> None:
        """An epoch-checked write of the learner was refused: :meth:`check_server` looks again."""
        self.epoch_lost = True

    def reset(self) -> None:
        """Forget what this consumer handed out: the server lost the streams (a restart without
        persistence), so ids in flight mean nothing there. Re-reads own pending entries next.
        Held entries stay held (their data is in memory; they keep their old epoch)."""
        self.in_flight.clear()
        self._own_cursor = {w: "0" for w in self.workers}
        self._claim_queue, self._claim_cursor, self._next_claim = [], "0-0", 0.0

    def receive(self, block_ms: int | None = None) -> int:
        """Read the next entries into :attr:`held` (see :meth:`read`); returns how many.

        Held entries that another learner claimed meanwhile (this one stalled past
        ``claim_idle_ms``) are dropped from :attr:`held`. Sets :attr:`backlog_full` (module doc).
        A dead-letter write refused for a changed epoch sets :attr:`epoch_lost` (see
        :meth:`check_server`).
        """
        try:
            delivered = self.read(block_ms)
        except EpochChanged:  # a rejected entry could not be counted: the server lost the run's data
            self.epoch_lost, delivered = True, []
        self.held = [d for d in self.held if d.key in self.in_flight] + delivered
        self.backlog_full = bool(self.held) and not delivered and self._nothing_more_can_come()
        return len(delivered)

    def _nothing_more_can_come(self) -> bool:
        """Every live worker (every roster worker when none is live) holds its credit in its stream
        or sent nothing for ``stall_s``. A worker of which this consumer holds its credit's worth
        of entries holds at least that in its stream (entries leave it only when settled): only the
        others' streams are read (one pipelined round trip; none in the learner-bound steady
        state, where the learner holds every worker's credit)."""
        now = time.monotonic()
        held = Counter(w for w, _ in self.in_flight)
        waiting = [w for w in (self.live or self.workers) if now - self._last_arrival.get(w, now) <= self.stall_s
                   and held[w] < self.credit.get(w, 1)]
        lengths = self.lengths(waiting)
        return all(lengths[w] >= self.credit.get(w, 1) for w in waiting)

    def held_positions(self) -> int:
        """Positions in :attr:`held`."""
        return sum(d.batch.num_positions for d in self.held)

    def take_updates(self, target: int, force: bool = False, agree: Agree | None = None) -> list[list[Delivered]]:
        """Take entries out of :attr:`held` into updates: groups of at least ``target`` positions,
        each as small as whole entries allow, in arrival order. Without ``force`` (or a full
        backlog, :attr:`backlog_full`) only the full groups; with it every held entry (the
        remainder as one smaller update). The rest stays held.

        With several learner ranks, ``agree`` (the ranks' collective, :data:`Agree`) makes every
        rank return as many updates (one collective): as many as the rank with the fewest full
        groups has, or, once some rank is forced or sees a full backlog, as many as it takes for
        every rank to train all it holds (a rank that runs out returns empty groups)."""
        flush = force or self.backlog_full
        groups, rest = [], []
        n = 0
        for d in self.held:
            rest.append(d)
            n += d.batch.num_positions
            if n >= target:
                groups.append(rest)
                rest, n = [], 0
        if agree is not None:
            fewest_full, most, flushing = agree([-len(groups), len(groups) + bool(rest), float(flush)], "max")
            if flushing:
                self.held = []
                out = groups + ([rest] if rest else [])
                return out + [[] for _ in range(int(most) - len(out))]
            count = int(-fewest_full)
        elif flush:
            self.held = []
            return groups + ([rest] if rest else [])
        else:
            count = len(groups)
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
        """The learner's outage check (:class:`~keisei_stream.wire.atomic.EpochWatch`): after an
        outage (or a write refused for its epoch), True when the run's ``epoch`` key is missing or
        not ours, i.e. the server restarted without the run's data (then call :meth:`recover`)."""
        self.epoch_lost = self._watch.changed(self.r, self.keys, force=self.epoch_lost)
        return self.epoch_lost

    @property
    def outage_checked(self) -> bool:
        """The last :meth:`check_server` followed an outage (it read the epoch): with the epoch
        intact, the server may still lack the newest writes (:meth:`record_failover`)."""
        return self._watch.looked

    def recover(self, accounting_before: Mapping[str, int], **fields: Any) -> dict[str, Any]:
        """The server lost the run's data: claim a new epoch, forget the ids in flight, put every
        worker it ever read on the roster back (the roster was lost with the rest; a refresh
        between the reconnection and this call read it empty), recreate the groups,
        republish the credit, and record the loss in the ``losses`` stream (old/new epoch, what was
        held and is kept, the unread positions lost by ``accounting_before``, plus ``fields``).

        Returns:
            The ``losses`` entry's fields.
        """
        old_epoch, found = self.epoch, self.r.get(self.keys.epoch)
        held, held_positions = len(self.in_flight), sum(self.in_flight.values())
        self.claim_epoch()
        self.reset()
        register_workers(self.r, self.keys, sorted(self.known))
        self.credit = {}  # every roster worker's group is created again
        self.refresh(force=True)
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
        again on every stream and the read returns nothing; the learner then records what was
        lost.

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
            for w in self.workers:
                ensure_group(self.r, self.keys, w)
            return []

    def _read(self, block_ms: int | None) -> list[Delivered]:
        self.refresh()
        self.keep_alive()
        own = [w for w in self.workers if w in self._own_cursor]
        if own:
            resp = self.r.xreadgroup(self.keys.group, self.name,
                                     {self.keys.experience(w): self._own_cursor[w] for w in own}, count=self.count)
            entries = self._entries(resp)
            for w in own:
                ids = [eid for x, eid, _ in entries if x == w]
                if ids:
                    self._own_cursor[w] = ids[-1]
                else:
                    del self._own_cursor[w]
            if entries:
                self.stats["own_pending"] += len(entries)
                return self._process(entries)
        now = time.monotonic()
        if now >= self._next_claim and self.workers:
            claimed = self._autoclaim()
            if claimed is not None:
                return claimed
            self._next_claim = now + self.claim_idle_ms / 2000.0
        block = self.block_ms if block_ms is None else int(block_ms)
        held = Counter(w for w, _ in self.in_flight)
        under = [w for w in self.workers if held[w] < self.credit.get(w, 1)]
        if not under:  # every stream at its quota: nothing to read until an update settles some
            time.sleep(block / 1000.0)
            return []
        resp = self.r.xreadgroup(self.keys.group, self.name, {self.keys.experience(w): ">" for w in under},
                                 count=self.count, block=block)
        return self._process(self._entries(resp))

    def _autoclaim(self) -> list[Delivered] | None:
        """XAUTOCLAIM pages over the streams in turn until one yields entries (returned), a stream
        has more pages (``[]``: come back next call), or the scan over every stream is complete
        (None)."""
        if not self._claim_queue:  # a new scan
            self._claim_queue, self._claim_cursor = list(self.workers), "0-0"
        while self._claim_queue:
            w = self._claim_queue[0]
            resp = self.r.xautoclaim(self.keys.experience(w), self.keys.group, self.name,
                                     min_idle_time=self.claim_idle_ms, start_id=self._claim_cursor, count=self.count)
            cursor = as_str(resp[0])
            entries = [(w, as_str(e[0]), e[1]) for e in resp[1]
                       if e is not None and e[1] and (w, as_str(e[0])) not in self.in_flight]
            done = cursor in ("0-0", "0")
            if done:
                self._claim_queue.pop(0)
            self._claim_cursor = "0-0" if done else cursor
            if entries:
                self.stats["claimed"] += len(entries)
                return self._process(entries)
            if not done:
                return []
        return None

    def _entries(self, resp: Any) -> list[tuple[str, str, Any]]:
        """An XREADGROUP reply (RESP2 list or RESP3 dict) as ``(worker, entry id, fields)``."""
        of = {self.keys.experience(w): w for w in self.workers}
        return [(of[stream], eid, fields) for stream, eid, fields in _stream_entries(resp) if stream in of]

    def _process(self, entries: list[tuple[str, str, Any]]) -> list[Delivered]:
        good: list[Delivered] = []
        now = time.monotonic()
        for worker, entry_id, fields in entries:
            if (worker, entry_id) in self.in_flight:
                continue  # already handed out by this consumer (re-delivery of our own pending)
            self._last_arrival[worker] = now
            self._check_id(worker, entry_id)
            if not fields:  # deleted while pending (redis-py gives None or {}); XADD needs >= 1 field
                self.r.xack(self.keys.experience(worker), self.keys.group, entry_id)
                continue
            t0 = time.monotonic()
            try:
                batch = decode_entry(fields, max_plies=self.max_plies, check_legal=self.check_legal,
                                     max_version=self.newest_version, worker=worker, games=self.games)
            except BadEntry as exc:
                self._reject(worker, entry_id, fields, exc)
                continue
            finally:
                self.decode_s += time.monotonic() - t0
            if (batch.batch_id in self._seen and self._seen[batch.batch_id] != (worker, entry_id)) or \
                    self.r.zscore(self.keys.trained_batches, batch.batch_id) is not None:
                self.games.discard()
                self._drop_duplicate(worker, entry_id, batch)  # a client retry, or a replay of a trained batch
                continue
            self.games.commit()
            self._remember(batch.batch_id, (worker, entry_id))
            self.in_flight[(worker, entry_id)] = batch.num_positions
            self.stats["good"] += 1
            good.append(Delivered(worker, entry_id, batch, self.epoch))
        return good

    def _check_id(self, worker: str, entry_id: str) -> None:
        """An id in the future (:data:`FUTURE_ID_MS`) is counted and its stream reset once empty."""
        try:
            ms = int(entry_id.partition("-")[0])
        except ValueError:
            return
        if ms > time.time() * 1000 + FUTURE_ID_MS and worker not in self._reset_due:
            self._reset_due.add(worker)
            self.stats["future_ids"] += 1
            retry.best_effort("confined count", self.r.hincrby, self.keys.confined, f"future_ids:{worker}", 1)

    def _remember(self, batch_id: str, key: tuple[str, str]) -> None:
        self._seen[batch_id] = key
        while len(self._seen) > self.dedup_window:
            self._seen.pop(next(iter(self._seen)))

    def _reject(self, worker: str, entry_id: str, fields: Mapping[Any, Any], exc: BadEntry) -> None:
        """Dead-letter the entry with its reason (:func:`deadletter_record`); count it, and the
        positions actually decoded from it (``exc.positions``, never the entry's own claim ``n``)."""
        self._discard(worker, entry_id, "rejected", exc.positions,
                      deadletter=deadletter_record(entry_id, fields, exc, self.name, worker))
        self.stats["bad"] += 1

    def _drop_duplicate(self, worker: str, entry_id: str, batch: ExperienceBatch) -> None:
        self._discard(worker, entry_id, "duplicate", batch.num_positions)
        self.stats["duplicate"] += 1

    def _discard(self, worker: str, entry_id: str, what: str, positions: int, deadletter: dict | None = None) -> None:
        """Atomically: (dead-letter,) acknowledge and delete the entry, and count it in
        ``{what}_entries:{worker}`` / ``{what}_positions:{worker}``."""
        k = self.keys
        stream = k.experience(worker)
        cmds: list[tuple] = []
        if deadletter is not None:
            flat = [x for kv in deadletter.items() for x in kv]
            cmds.append(("XADD", k.deadletter, "MAXLEN", "~", self.deadletter_maxlen, "*", *flat))
        cmds += [("XACK", stream, k.group, entry_id), ("XDEL", stream, entry_id),
                 ("HINCRBY", k.accounting, f"{what}_entries:{worker}", 1),
                 ("HINCRBY", k.accounting, f"{what}_positions:{worker}", int(positions))]
        run_atomic(self.r, self.keys, cmds, self.epoch)

    # -- acknowledging -----------------------------------------------------------------------
    def ack(self, entries: Iterable[Delivered], trained_positions: int | Sequence[int],
            stale_positions: int | Sequence[int]) -> None:
        """Acknowledge and delete ``entries`` after the update that used them, atomically (also
        when Redis is at maxmemory, never into a server that lost the run's data: see
        :func:`keisei_stream.wire.atomic.run_atomic`).

        Counts each entry's trained and stale positions in its worker's accounting only if this
        acknowledgement is the one that removed it from the group's pending entries: an entry two
        learners held (one stalled past ``claim_idle_ms`` and another claimed it) is counted once
        (the second acknowledgement increments ``double_acks``). Adds the batch ids to
        ``trained_batches`` (the newest :data:`TRAINED_BATCHES_KEPT`), so a replay of a trained
        batch is dropped even by a restarted learner.

        Args:
            entries: what the update used.
            trained_positions, stale_positions: per entry (sequences, in ``entries`` order), or
                totals, assigned to the entries in order (trained first).
        """
        k = self.keys
        entries = list(entries)
        trained, stale = _per_entry(entries, trained_positions, stale_positions)
        now_ms = int(time.time() * 1000)
        batch_ids = [x for e in entries for x in (now_ms, e.batch.batch_id)]
        cmds: list[tuple] = [("ACK_COUNTED", k.experience(e.worker), k.group, k.accounting, e.entry_id, t, s,
                              f":{e.worker}") for e, t, s in zip(entries, trained, stale)]
        if batch_ids:
            cmds += [("ZADD", k.trained_batches, *batch_ids),
                     ("ZREMRANGEBYRANK", k.trained_batches, 0, -(TRAINED_BATCHES_KEPT + 1))]
        if cmds:
            run_atomic(self.r, self.keys, cmds, self.epoch, self.wait)
        for e in entries:
            self.in_flight.pop(e.key, None)

    def keep_alive(self, force: bool = False) -> None:
        """Reset the idle time of the entries this consumer holds (``XCLAIM ... JUSTID`` of the
        ones it still owns, one script per stream, at most every ``claim_idle_ms / 4``), so that no
        other learner claims an entry only because this one held it long (waiting to fill an
        update). Entries another consumer claimed meanwhile (this one stalled past
        ``claim_idle_ms``) are forgotten: they are no longer in :attr:`in_flight`, and the learner
        drops them."""
        now = time.monotonic()
        if not self.in_flight or (not force and now < self._next_keep_alive):
            return
        self._next_keep_alive = now + self.claim_idle_ms / 4000.0
        by_worker: dict[str, list[str]] = {}
        for w, eid in self.in_flight:
            by_worker.setdefault(w, []).append(eid)
        for w, ids in by_worker.items():
            kept = set()
            for s in range(0, len(ids), 500):
                kept |= {as_str(x) for x in self.r.eval(_KEEP_ALIVE_LUA, 1, self.keys.experience(w), self.keys.group,
                                                         self.name, *ids[s:s + 500])}
            for i in ids:
                if i not in kept:
                    self.in_flight.pop((w, i), None)
                    self.stats["lost_to_claims"] += 1


def unsettled(accounting: Mapping[str, int]) -> int:
    """Positions produced and not yet trained, stale, rejected or dropped as duplicates: what is in
    the streams or held by a learner (the accounting identity's difference)."""
    a = accounting
    return (a.get("produced_positions", 0) - a.get("trained_positions", 0) - a.get("stale_positions", 0)
            - a.get("rejected_positions", 0) - a.get("duplicate_positions", 0))


def deadletter_record(entry_id: str, fields: Mapping[Any, Any], exc: BadEntry, consumer: str,
                      stream_worker: str = "") -> dict[Any, Any]:
    """The ``deadletter`` entry of a rejected entry: the reason, the entry id, the worker whose
    stream it came from (``stream_worker``), the consumer, the positions decoded and claimed, the
    worker the entry names, and the raw fields (at most 16, each cut at
    :data:`DEADLETTER_FIELD_BYTES`)."""
    dl: dict[Any, Any] = {"reason": exc.reason, "entry_id": entry_id, "stream_worker": stream_worker,
                          "consumer": consumer, "decoded_positions": exc.positions,
                          "claimed_positions": entry_positions(fields)}
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


def _per_entry(entries: list[Delivered], trained: int | Sequence[int],
               stale: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Per-entry trained and stale positions: given per entry, or totals assigned in order."""
    if not isinstance(trained, int) and not isinstance(stale, int):
        return [int(x) for x in trained], [int(x) for x in stale]
    t_left, s_left = int(trained), int(stale)
    t_out, s_out = [], []
    for e in entries:
        n = e.batch.num_positions
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

# Delete and recreate stream KEYS[1] with its group ARGV[1] only while it is empty and nothing of it
# is pending: a worker's stream whose ids its own credential pushed to the future (the largest id
# leaves no XADD * possible) starts again, and nothing unread or unsettled is lost. 1 when done.
_RESET_STREAM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
  if redis.call('XPENDING', KEYS[1], ARGV[1])[1] > 0 then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"""


def _stream_entries(resp: Any) -> list[tuple[str, str, Any]]:
    """Flatten an XREADGROUP reply (RESP2 list or RESP3 dict) into ``(stream key, entry id, fields)``."""
    if not resp:
        return []
    pairs = resp.items() if isinstance(resp, dict) else resp
    out = []
    for stream, items in pairs:
        if items and isinstance(items[0], list) and items[0] and isinstance(items[0][0], (list, tuple)):
            items = items[0]  # RESP3: [[entries]]
        for item in items or []:
            out.append((as_str(stream), as_str(item[0]), item[1]))
    return out
