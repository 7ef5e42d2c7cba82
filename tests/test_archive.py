"""The game archive: chunks of gzip members, exactly-once from the games stream across restarts."""

from __future__ import annotations

import gzip

import pytest

from keisei_stream.wire.archive import COLUMNS, GROUP, GameArchive, Recorder, chunks, read_archive
from keisei_stream.wire.keys import Keys

K = Keys("arch")


def _game(i: int) -> dict:
    return {"start_sfen": "startpos", "moves": "7g7f 3c3d", "result": (i % 3) - 1, "reason": "MAX_PLIES",
            "plies": 2, "opening_plies": 0, "worker": f"w{i % 2}", "version": i}


def test_archive_appends_chunks_and_reads_back(tmp_path):
    a = GameArchive(tmp_path, games_per_chunk=3)
    rows = [dict(zip(COLUMNS, [f"{i}-0", "1", "CHECKMATE", "2", "w", "1", "0", "startpos", "7g7f 3c3d"]))
            for i in range(1, 8)]
    assert a.append(rows[:2]) == 2 and a.append(rows[2:]) == 5
    assert [p.name for p in chunks(tmp_path)] == ["games-000000.tsv.gz", "games-000001.tsv.gz", "games-000002.tsv.gz"]
    assert [r["id"] for r in read_archive(tmp_path)] == [f"{i}-0" for i in range(1, 8)]
    # zcat reads a chunk of several members whole
    assert gzip.decompress(chunks(tmp_path)[0].read_bytes()).decode().count("\n") == 4  # header + 3 games
    again = GameArchive(tmp_path, games_per_chunk=3)
    assert again.append(rows) == 0  # nothing written twice
    assert again.last_id == "7-0"


def test_archive_survives_a_truncated_member(tmp_path):
    a = GameArchive(tmp_path)
    row = dict(zip(COLUMNS, ["1-0", "0", "MAX_PLIES", "2", "w", "1", "0", "startpos", "7g7f 3c3d"]))
    a.append([row])
    a.append([{**row, "id": "2-0"}])
    path = chunks(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-7])  # a crash in the middle of the second member
    assert [r["id"] for r in read_archive(tmp_path)] == ["1-0"]


@pytest.mark.redis
def test_recorder_archives_every_game_once_across_a_restart(real_redis, tmp_path):
    for i in range(5):
        real_redis.xadd(K.games, _game(i))
    rec = Recorder(real_redis, K, GameArchive(tmp_path / "games"), flush_s=3600, flush_games=1000)
    assert rec.step() == 0  # read, not yet due
    # a crash here: the entries are pending, nothing archived; a new recorder re-reads them
    rec2 = Recorder(real_redis, K, GameArchive(tmp_path / "games"), flush_s=3600)
    assert rec2.step() == 5
    for i in range(5, 8):
        real_redis.xadd(K.games, _game(i))
    assert rec2.step(force=True) == 3
    assert rec2.step(force=True) == 0
    ids = [r["id"] for r in read_archive(tmp_path / "games")]
    assert len(ids) == len(set(ids)) == 8
    assert real_redis.xpending(K.games, GROUP)["pending"] == 0
    versions = [int(r["version"]) for r in read_archive(tmp_path / "games")]
    assert versions == list(range(8))


def test_appending_after_a_crash_keeps_every_game_readable(tmp_path):
    a = GameArchive(tmp_path)
    row = dict(zip(COLUMNS, ["1-0", "0", "MAX_PLIES", "2", "w", "1", "0", "startpos", "7g7f 3c3d"]))
    a.append([row, {**row, "id": "2-0"}])
    a.append([{**row, "id": "3-0"}])
    path = chunks(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-5])  # 3-0 lost in a crash, so never acknowledged
    b = GameArchive(tmp_path)
    assert b.append([{**row, "id": "3-0"}, {**row, "id": "4-0"}]) == 2
    assert [r["id"] for r in read_archive(tmp_path)] == ["1-0", "2-0", "3-0", "4-0"]


@pytest.mark.redis
def test_a_forced_step_archives_every_game_in_the_stream(real_redis, tmp_path):
    for i in range(2500):  # more than one read (1000 entries) holds
        real_redis.xadd(K.games, _game(i))
    rec = Recorder(real_redis, K, GameArchive(tmp_path / "games"), flush_s=3600)
    assert rec.step(force=True) == 2500
    assert len(list(read_archive(tmp_path / "games"))) == 2500
