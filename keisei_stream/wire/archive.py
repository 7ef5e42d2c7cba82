"""Durable archive of a run's self-play games, written from the ``games`` stream through a consumer group.

Each worker adds its finished games to its own capped stream ``games:{id}``; the learner moves
them into the shared ``games`` stream (:meth:`Recorder.forward`: one ``XREADGROUP`` over the
workers' game streams, then per entry, atomically, ``XADD games`` with the worker's id taken from
the stream and only the record's known fields, each cut at :data:`FIELD_BYTES`, and ``XACK`` +
``XDEL`` of the worker's entry), so no worker writes a key another worker's games are in.

The ``games`` stream is capped (``stream.games_maxlen``) and lives in the run's Redis; the
archive keeps every game on disk after both are gone. Layout, under ``runs/{run}/games/``:

* ``games-{chunk:06d}.tsv.gz``: chunks of at most ``games_per_chunk`` games; each is a series of
  gzip members (one per flush), so appending never rewrites a file and ``zcat`` reads it whole.
* one line per game, tab-separated, the columns of :data:`COLUMNS`: the ``games`` stream entry id,
  ``result`` (+1 Black won, -1 White won, 0 draw), ``reason`` (``EndReason`` name), ``plies``,
  ``worker``, ``version`` (model version of the worker when the game ended), ``opening_plies``,
  ``start`` (``startpos`` or a SFEN) and ``moves`` (USI, space-separated). A header line starting
  with ``#`` opens each chunk.

Exactly once across restarts: entries are acknowledged in the consumer group ``recorders`` only
after their lines are flushed and fsynced, and a restarted recorder skips re-delivered entries
whose id is not newer than the last archived one (stream ids only grow), so nothing is missed or
written twice. A chunk whose last gzip member was cut short by a crash is read up to its last whole member
(the games of the cut member were not acknowledged, so they are archived again into a new chunk).

Size: about 0.76 KB per quickstart game of about 370 plies (gzip level 6; the manual's results page).
"""

from __future__ import annotations

import gzip
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import redis

from .atomic import create_group, run_atomic
from .client import as_str
from .keys import Keys

COLUMNS = ("id", "result", "reason", "plies", "worker", "version", "opening_plies", "start", "moves")
GROUP = "recorders"
#: The fields of a game record a worker sends (``GameRecord.to_dict()`` plus ``version``); the
#: learner forwards only these, plus ``worker``.
RECORD_FIELDS = ("start_sfen", "moves", "result", "result_str", "reason", "plies", "opening_plies", "version")
#: Longest value of a forwarded field (bytes): a 65,535-ply game's USI moves fit.
FIELD_BYTES = 6 * 65_536
_CHUNK_RE = re.compile(r"^games-(\d{6})\.tsv\.gz$")


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _clean(value: str) -> str:
    return value.replace("\t", " ").replace("\n", " ")


def row_from_fields(entry_id: str, fields: dict) -> dict[str, str]:
    """The archive row of one ``games`` stream entry (missing fields become empty strings)."""
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    start = f.get("start_sfen", "startpos") or "startpos"
    row = {"id": entry_id, "start": start, **{c: f.get(c, "") for c in COLUMNS if c not in ("id", "start")}}
    return {c: _clean(row[c]) for c in COLUMNS}


def chunks(directory: str | Path) -> list[Path]:
    """The archive's chunk files, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _CHUNK_RE.match(p.name))


def _members(path: Path) -> tuple[str, bool]:
    """The text of a chunk's whole gzip members, and whether the file ends cleanly (False: the
    last member was cut short by a crash and is ignored)."""
    data = path.read_bytes()
    text = []
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            member = d.decompress(data)
        except zlib.error:
            return "".join(text), False
        if not d.eof:
            return "".join(text), False
        text.append(member.decode("utf-8", "replace"))
        data = d.unused_data
    return "".join(text), True


def _read_chunk(path: Path) -> Iterator[dict[str, str]]:
    """Rows of one chunk (its whole members)."""
    for line in _members(path)[0].split("\n"):
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) == len(COLUMNS):
            yield dict(zip(COLUMNS, parts))


def read_archive(directory: str | Path) -> Iterator[dict[str, str]]:
    """Every archived game as a dict of :data:`COLUMNS` (strings), oldest first."""
    for path in chunks(directory):
        yield from _read_chunk(path)


def read_newest(directory: str | Path, count: int | None = None, before: str | None = None) -> list[dict[str, str]]:
    """The newest ``count`` archived games (every one when None) whose stream id is older than
    ``before`` (no bound when None), oldest first.

    Chunks are read from the newest back, only as far as needed (ids only grow from one chunk to
    the next), so the newest few games of a long run cost one chunk's decompression.
    """
    if count is not None and count <= 0:
        return []
    bound = _id_key(before) if before else None
    picked: list[dict[str, str]] = []
    for path in reversed(chunks(directory)):
        rows = [row for row in _read_chunk(path) if bound is None or _id_key(row["id"]) < bound]
        picked = rows + picked
        if count is not None and len(picked) >= count:
            return picked[-count:]
    return picked


@dataclass
class GameArchive:
    """Appends game rows to the chunk files of ``directory`` (see the module docstring).

    Args:
        directory: ``runs/{run}/games`` (created on the first write).
        games_per_chunk: games per chunk file before a new one is started.
    """

    directory: Path
    games_per_chunk: int = 10_000
    last_id: str | None = None
    _chunk: int = 0
    _in_chunk: int = 0
    _loaded: bool = field(default=False, repr=False)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        found = chunks(self.directory)
        if found:
            self._chunk = int(_CHUNK_RE.match(found[-1].name).group(1))
            rows = list(_read_chunk(found[-1]))
            self._in_chunk = len(rows)
            if rows:
                self.last_id = rows[-1]["id"]
            if not _members(found[-1])[1]:  # cut short by a crash: never append behind the damage
                self._chunk, self._in_chunk = self._chunk + 1, 0

    def is_archived(self, entry_id: str) -> bool:
        """True when ``entry_id`` is not newer than the last archived entry."""
        self._load()
        return self.last_id is not None and _id_key(entry_id) <= _id_key(self.last_id)

    def append(self, rows: list[dict[str, str]]) -> int:
        """Append ``rows`` (in stream order) as gzip members, fsynced; rows already archived are
        skipped. Returns the number of rows written.

        Raises:
            OSError: the directory or file cannot be written (nothing is acknowledged then).
        """
        self._load()
        rows = [row for row in rows if not self.is_archived(row["id"])]
        written = 0
        while written < len(rows):
            if self._in_chunk >= self.games_per_chunk:
                self._chunk, self._in_chunk = self._chunk + 1, 0
            take = rows[written:written + self.games_per_chunk - self._in_chunk]
            path = Path(self.directory) / f"games-{self._chunk:06d}.tsv.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = ["#" + "\t".join(COLUMNS)] if self._in_chunk == 0 else []
            lines += ["\t".join(row[c] for c in COLUMNS) for row in take]
            with open(path, "ab") as fh:
                fh.write(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))
                fh.flush()
                os.fsync(fh.fileno())
            self._in_chunk += len(take)
            written += len(take)
            self.last_id = take[-1]["id"]
        return written


@dataclass
class Recorder:
    """Moves finished games from the ``games`` stream into a :class:`GameArchive`.

    Call :meth:`step` often (the learner does, once per loop): it reads what is new in the
    consumer group ``recorders`` (own pending entries first), and every ``flush_s`` seconds or
    ``flush_games`` games appends them to the archive and acknowledges them.

    Args:
        r: client. keys: the run's keys. archive: where games go. consumer: consumer name.
    """

    r: redis.Redis
    keys: Keys
    archive: GameArchive
    consumer: str = "recorder-0"
    flush_s: float = 10.0
    flush_games: int = 500
    games_maxlen: int = 10_000
    archived: int = 0
    forwarded: int = 0
    _buffer: list[tuple[str, dict[str, str] | None]] = field(default_factory=list)
    _pending_first: bool = True
    _last_flush: float = field(default_factory=time.monotonic)
    _sources: dict[str, str] = field(default_factory=dict)  # worker -> cursor of its game stream ("0": own pending first)

    def __post_init__(self) -> None:
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the group ``recorders`` on the games stream at id 0 (MKSTREAM); idempotent, and
        also on a full server (:func:`keisei_stream.wire.atomic.create_group`)."""
        create_group(self.r, self.keys, self.keys.games, GROUP, "the games archive's group")

    def _read(self, start: str) -> list[tuple[str, dict]]:
        try:
            resp = self.r.xreadgroup(GROUP, self.consumer, {self.keys.games: start}, count=1000)
        except redis.ResponseError as exc:  # the server restarted without the run's data
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return []
        return [(as_str(eid), fields) for _stream, entries in resp or [] for eid, fields in entries]

    def forward(self, workers: Sequence[str]) -> int:
        """Move what is new in the game streams of ``workers`` into ``games`` (module doc); returns
        how many games. A worker stream seen for the first time gets the group ``recorders``."""
        for w in workers:
            if w not in self._sources:
                create_group(self.r, self.keys, self.keys.worker_games(w), GROUP, f"the game group on {w}'s stream")
                self._sources[w] = "0"
        if not workers:
            return 0
        of = {self.keys.worker_games(w): w for w in workers}
        try:
            resp = self.r.xreadgroup(GROUP, self.consumer, {k: self._sources.get(w, ">") for k, w in of.items()},
                                     count=1000)
        except redis.ResponseError as exc:  # the server restarted without the run's data
            if "NOGROUP" not in str(exc):
                raise
            self._sources.clear()
            return 0
        got = {of[as_str(k)]: v for k, v in (resp.items() if isinstance(resp, dict) else resp or [])
               if as_str(k) in of}
        moved = 0
        for w in workers:
            entries = got.get(w) or []
            if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], (list, tuple)):
                entries = entries[0]  # RESP3
            if self._sources[w] != ">":  # re-reading its own pending entries: go on after the last, or done
                self._sources[w] = as_str(entries[-1][0]) if entries else ">"
            stream_key = self.keys.worker_games(w)
            cmds: list[tuple] = []
            for eid, fields in entries:
                if fields:
                    f = {as_str(k): v for k, v in fields.items()}
                    flat = [x for k in RECORD_FIELDS if k in f for x in (k, f[k][:FIELD_BYTES])]
                    cmds.append(("XADD", self.keys.games, "MAXLEN", "~", self.games_maxlen, "*", *flat, "worker", w))
                    moved += 1
                cmds += [("XACK", stream_key, GROUP, as_str(eid)), ("XDEL", stream_key, as_str(eid))]
            if cmds:
                run_atomic(self.r, self.keys, cmds, None)
        self.forwarded += moved
        return moved

    def step(self, workers: Sequence[str] = (), force: bool = False) -> int:
        """Move the games of ``workers`` into ``games`` (:meth:`forward`), read new ``games``
        entries (with ``force``: all there are) and flush when due (or ``force``). Returns the
        games archived now."""
        self.forward(workers)
        while True:
            items = self._read("0") if self._pending_first else []
            if not items:
                self._pending_first = False
                items = self._read(">")
            seen = {eid for eid, _ in self._buffer}
            # a pending entry trimmed from the stream comes back without fields: acknowledge it only
            self._buffer += [(eid, row_from_fields(eid, f) if f else None) for eid, f in items if eid not in seen]
            if self._pending_first:  # pending entries re-read at "0" until all are acknowledged
                force = True
            if not (force and items) or self._pending_first:
                break
        due = force or len(self._buffer) >= self.flush_games or time.monotonic() - self._last_flush >= self.flush_s
        if not due or not self._buffer:
            return 0
        written = self.archive.append([row for _, row in self._buffer if row is not None])
        self.r.xack(self.keys.games, GROUP, *[eid for eid, _ in self._buffer])
        self._buffer.clear()
        self._last_flush = time.monotonic()
        self.archived += written
        return written
