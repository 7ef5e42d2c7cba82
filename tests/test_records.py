"""Game records: stream fields round trip, KIF/CSA/USI export re-parsed by cshogi's parsers to
the same moves for every kind of ending, and the ``keisei games`` CLI (stream on fakeredis and
``keisei eval --json`` files)."""

from __future__ import annotations

import json

import cshogi
import pytest
from cshogi import CSA, KIF

from keisei_stream.cli.main import main as cli_main
from keisei_stream.play import records
from keisei_stream.play.evaluation.baselines import GreedyPlayer, RandomPlayer
from keisei_stream.play.evaluation.match import play_game, play_match
from keisei_stream.play.records import Game, RecordError, parse_game_fields
from keisei_stream.wire.status import game_fields  # what the worker writes (append_game)
from keisei_stream.shogi import STARTING_SFEN, EndReason, GameRecord, legal_move_from_usi
from keisei_stream.wire import client

from tests.helpers import Scripted


def _games() -> list[Game]:
    """One game per kind of ending."""
    out = []
    for seed in range(6):
        rec = play_game(GreedyPlayer(seed), RandomPlayer(seed + 100), max_plies=120 if seed % 2 else 256)
        out.append(records.game_from_eval(dict(rec, game=seed, black="greedy", white="random")))
    scripted = [
        (["4h5h", "5h4h"], ["5a4a", "4a5a"], "4k4/9/9/9/9/9/9/5R3/K8 b - 1"),  # perpetual check
        (["2h1h", "1h2h"], ["8b9b", "9b8b"], "startpos"),  # repetition
        (["7g7f", "1a1b"], ["3c3d"], "startpos"),  # illegal move by Black
        (["7g7f"], ["resign"], "startpos"),
        (["G*1b"], ["1a2a"], "8k/9/8P/9/9/9/9/9/K8 b G 1"),  # checkmate
        (["1a1b"], ["1i1h"], "K+P+P+P+P+P+P+P1/+P+P+P6/9/9/9/9/9/9/8k b RB2G2S2N2L2P 1"),  # entering king
    ]
    for i, (b, w, start) in enumerate(scripted):
        rec = play_game(Scripted(b), Scripted(w), start_sfen=start)
        out.append(records.game_from_eval(dict(rec, game=100 + i)))
    out.append(Game(STARTING_SFEN, ["7g7f", "3c3d"], 1, "timeout", "a", "b", "t"))
    out.append(Game(STARTING_SFEN, ["7g7f"], -1, "crash", "a", "b", "c"))
    return out


def _usi_moves(moves):
    return [cshogi.move_to_usi(m) for m in moves]


def test_stream_fields_round_trip():
    rec = GameRecord(start_sfen=STARTING_SFEN, moves=["7g7f", "3c3d", "8h2b+"], result=1,
                     reason=EndReason.MAX_PLIES, plies=3, opening_plies=2)
    f = game_fields(rec, worker="w0", version=7)
    assert f["moves"] == "7g7f 3c3d 8h2b+" and f["reason"] == "MAX_PLIES" and f["version"] == 7
    as_bytes = {k.encode(): str(v).encode() for k, v in f.items()}  # what redis-py returns
    back = parse_game_fields(as_bytes)
    assert back == rec
    g = records.game_from_fields(as_bytes, "1-0")
    assert g.meta == {"worker": "w0", "version": "7"} and g.black == "self-play v7"
    alt = parse_game_fields({"usi": "position startpos moves 7g7f 3c3d", "result": "0", "reason": "2"})
    assert alt.moves == ["7g7f", "3c3d"] and alt.reason == EndReason.REPETITION_DRAW
    sf = parse_game_fields({"usi": "position sfen 4k4/9/9/9/9/9/9/5R3/K8 b - 1 moves 4h5h", "reason": "checkmate"})
    assert sf.start_sfen == "4k4/9/9/9/9/9/9/5R3/K8 b - 1" and sf.reason == EndReason.CHECKMATE
    for bad in ({"moves": "7g7f 7g7f"}, {"moves": "7g7f", "reason": "nope"}, {"result": "1"},
                {"moves": "7g7f", "result": "2"}, {"moves": "", "start_sfen": "xx"}, {"usi": "position foo"}):
        with pytest.raises(RecordError):
            parse_game_fields(bad)


def test_usi_text_becomes_a_legal_move_or_a_clear_error():
    """The one USI text -> legal move check the engine, matches and records share."""
    board = cshogi.Board()
    assert legal_move_from_usi(board, "7g7f") in list(board.legal_moves)
    # cshogi's is_legal takes a promotion outside the zone; the generator's moves do not have it
    assert board.is_legal(board.move_from_usi("2g2f+"))
    with pytest.raises(ValueError, match="is not a legal move"):
        legal_move_from_usi(board, "2g2f+")
    board.push_usi("7g7f")
    for bad in ("7g7f", "7g7a", "P*5e", "1a1b+", "", "resign", "x" * 40, "7g7f\x00", None, 76):
        with pytest.raises(ValueError, match="is not a legal move"):
            legal_move_from_usi(board, bad)
    assert cshogi.move_to_usi(legal_move_from_usi(board, "3c3d")) == "3c3d"
    # the records report the move's number; a game with an illegal move exports nothing
    with pytest.raises(RecordError, match="move 2 '7g7f' is not legal"):
        parse_game_fields({"moves": "7g7f 7g7f"})
    with pytest.raises(RecordError, match="move 1"):
        records.to_kif(Game(STARTING_SFEN, ["5e5d"], 0, "max_plies"))


def test_kif_and_csa_reparse_to_same_moves(tmp_path):
    games = _games()
    reasons = {g.reason for g in games}
    assert {"checkmate", "perpetual_check", "repetition", "illegal", "resign", "entering_king", "timeout",
            "crash", "max_plies"} <= reasons
    for g in games:
        csa = CSA.Parser.parse_str(records.to_csa(g))[0]
        assert _usi_moves(csa.moves) == g.moves, g.id
        assert cshogi.Board(csa.sfen).zobrist_hash() == cshogi.Board(g.start_sfen).zobrist_hash()
        assert csa.names == [g.black, g.white]
        if g.start_sfen == STARTING_SFEN:  # cshogi's KIF parser reads only 手合割 headers, not BOD
            kif = KIF.Parser.parse_str(records.to_kif(g))
            assert _usi_moves(kif.moves) == g.moves, g.id
            if g.result != 0 and g.reason != "entering_king":
                assert kif.win == (cshogi.BLACK_WIN if g.result > 0 else cshogi.WHITE_WIN), g.id
    paths = records.export_games(games, "kif", tmp_path / "kif")
    assert len(paths) == len(games)
    for p, g in zip(paths, games):  # files are cp932 as GUIs expect; cshogi reads them back
        if g.start_sfen == STARTING_SFEN:
            assert _usi_moves(KIF.Parser.parse_file(str(p)).moves) == g.moves
    for p, g in zip(records.export_games(games, "csa", tmp_path / "csa"), games):
        assert _usi_moves(CSA.Parser.parse_file(str(p))[0].moves) == g.moves
    (usi,) = records.export_games(games, "usi", tmp_path / "usi")
    lines = usi.read_text().splitlines()
    assert len(lines) == 2 * len(games) and lines[0].startswith("position ")
    with pytest.raises(ValueError):
        records.export_games(games, "pgn", tmp_path)


def test_cli_export_formats_are_the_records_formats():
    from keisei_stream.cli.main import EXPORT_FORMATS

    assert sorted(EXPORT_FORMATS) == sorted(records.FORMATS)


def test_cli_on_eval_json(tmp_path, capsys):
    res = play_match("greedy", "random", games=4, max_plies=60, progress=False)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(res.to_dict()))
    assert cli_main(["games", "export", "--eval-json", str(path), "--format", "csa", "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.csa"))) == 4
    svg = tmp_path / "b.svg"
    assert cli_main(["games", "show", "--eval-json", str(path), "--index", "0", "--ply", "10", "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert "after 10 plies" in out and "greedy" in out
    assert svg.read_text().startswith("<svg")
    assert cli_main(["games", "list", "--eval-json", str(path)]) == 0
    assert "eval-0003" in capsys.readouterr().out


def test_cli_on_games_stream(tmp_path, monkeypatch, capsys):
    fakeredis = pytest.importorskip("fakeredis")
    from keisei_stream.wire.keys import Keys

    r = fakeredis.FakeRedis()
    monkeypatch.setattr(client, "connect", lambda url, **kw: r)
    keys = Keys("g1")
    for seed in range(3):
        rec = play_game(RandomPlayer(seed), RandomPlayer(seed + 1), max_plies=50)
        gr = GameRecord(STARTING_SFEN, rec["moves"], rec["result"], EndReason.MAX_PLIES if rec["reason"] == "max_plies"
                        else EndReason.CHECKMATE, rec["plies"])
        r.xadd(keys.games, game_fields(gr, worker="w1", version=seed))
    r.xadd(keys.games, {"moves": "7g7f 7g7f", "result": "0", "reason": "MAX_PLIES"})  # bad entry: skipped
    games = records.read_stream_games(r, "g1", count=10)
    assert len(games) == 3 and [g.meta["version"] for g in games] == ["0", "1", "2"]
    assert cli_main(["games", "export", "--redis", "fake://", "--run", "g1", "--format", "kif", "--out",
                         str(tmp_path / "k"), "--count", "2"]) == 0
    files = sorted((tmp_path / "k").glob("*.kif"))
    assert len(files) == 1 or len(files) == 2  # the newest 2 entries: one is the bad one
    for f in files:
        KIF.Parser.parse_file(str(f))
    assert cli_main(["games", "show", "--redis", "fake://", "--run", "g1"]) == 0
    assert "self-play" in capsys.readouterr().out
    assert cli_main(["games", "list", "--redis", "fake://", "--run", "empty"]) == 1


# ------------------------------------------------------------------------------------------------
# the run's game archive (runs/{run}/games) as a source for `keisei games`


def _selfplay_fields(seed: int, plies: int = 40) -> dict:
    rec = play_game(RandomPlayer(seed), RandomPlayer(seed + 50), max_plies=plies)
    reason = {"max_plies": EndReason.MAX_PLIES, "checkmate": EndReason.CHECKMATE,
              "repetition": EndReason.REPETITION_DRAW}.get(rec["reason"], EndReason.PERPETUAL_CHECK)
    gr = GameRecord(STARTING_SFEN, rec["moves"], rec["result"], reason, rec["plies"], opening_plies=2)
    return game_fields(gr, worker=f"w{seed % 2}", version=seed)


def _archive(run_dir, entries) -> None:
    """Archive ``(entry_id, fields)`` as the learner's recorder does."""
    from keisei_stream.wire.archive import GameArchive, row_from_fields

    GameArchive(run_dir / "games", games_per_chunk=3).append([row_from_fields(eid, f) for eid, f in entries])


def test_archive_rows_become_the_same_games_as_stream_entries(tmp_path):
    entries = [(f"{1000 + i}-0", _selfplay_fields(i)) for i in range(7)]
    _archive(tmp_path / "r", entries)
    games = records.read_archive_games(tmp_path / "r" / "games")
    from_stream = records.games_from_entries([(eid, {k: str(v) for k, v in f.items()}) for eid, f in entries])
    assert [g.id for g in games] == [f"{1000 + i}_0" for i in range(7)]
    for a, s in zip(games, from_stream):
        assert (a.id, a.moves, a.result, a.reason, a.black, a.meta) == (s.id, s.moves, s.result, s.reason, s.black, s.meta)
    assert games[3].meta == {"worker": "w1", "version": "3"} and games[3].black == "self-play v3"
    # the newest N, and those older than a stream id, reading chunks from the newest back
    assert [g.id for g in records.read_archive_games(tmp_path / "r" / "games", 2)] == ["1005_0", "1006_0"]
    assert [g.id for g in records.read_archive_games(tmp_path / "r" / "games", 2, before="1004-0")] == ["1002_0", "1003_0"]
    assert records.read_archive_games(tmp_path / "nothing") == []
    # a row whose reason names the EndReason vocabulary in lower case reads too (one mapping, records.py)
    row = {"id": "1-0", "result": "1", "reason": "checkmate", "start": "8k/9/8P/9/9/9/9/9/K8 b G 1",
           "moves": "G*1b", "opening_plies": "0", "worker": "", "version": ""}
    g = records.game_from_archive_row(row)
    assert g.reason == "checkmate" and g.meta == {} and g.start_sfen == "8k/9/8P/9/9/9/9/9/K8 b G 1"
    with pytest.raises(RecordError):
        records.game_from_archive_row({**row, "moves": "G*1b G*1b"})


def test_cli_games_on_a_stopped_run_reads_the_archive(tmp_path, capsys):
    """No Redis at all: list/show/export answer from runs/{run}/games; exports re-parse to the same moves."""
    entries = [(f"{2000 + i}-0", _selfplay_fields(i, plies=60)) for i in range(12)]
    _archive(tmp_path / "done", entries)
    base = ["--run", "done", "--runs-dir", str(tmp_path)]
    assert cli_main(["games", "list", *base, "--count", "5"]) == 0
    out = capsys.readouterr().out
    assert "2011_0" in out and "2007_0" in out and "2006_0" not in out and "from the archive" in out
    for fmt, parse in (("kif", lambda p: KIF.Parser.parse_file(str(p)).moves),
                       ("csa", lambda p: CSA.Parser.parse_file(str(p))[0].moves)):
        out_dir = tmp_path / fmt
        assert cli_main(["games", "export", *base, "--all", "--format", fmt, "--out", str(out_dir)]) == 0
        files = sorted(out_dir.glob(f"*.{fmt}"))
        assert len(files) == 12
        for f, (eid, fields) in zip(files, entries):
            assert f.stem == eid.replace("-", "_")
            assert _usi_moves(parse(f)) == fields["moves"].split()
    assert cli_main(["games", "show", *base, "--index", "0", "--ply", "5"]) == 0
    assert "after 5 plies" in capsys.readouterr().out
    # a killed run leaves a redis.url that nothing answers: the archive still answers, quickly
    (tmp_path / "done" / "redis.url").write_text(f"unix://{tmp_path}/gone.sock\n")
    assert cli_main(["games", "list", *base, "--count", "3"]) == 0
    assert "does not answer" in capsys.readouterr().out
    # --source stream insists on Redis; an unknown run has neither
    assert cli_main(["games", "list", *base, "--source", "stream"]) == 1
    assert cli_main(["games", "list", "--run", "never", "--runs-dir", str(tmp_path)]) == 1
    assert "no game archive" in capsys.readouterr().err


def test_cli_games_auto_joins_stream_and_archive_without_duplicates(tmp_path, monkeypatch, capsys):
    """A live run: the newest games from the capped stream, older ones from the archive; the archive
    lags the stream (not yet flushed) and overlaps it; every game once, in order."""
    fakeredis = pytest.importorskip("fakeredis")
    from keisei_stream.wire.keys import Keys

    r = fakeredis.FakeRedis()
    monkeypatch.setattr(client, "connect", lambda url, **kw: r)
    keys = Keys("live")
    entries = [(f"{3000 + i}-0", _selfplay_fields(i, plies=30)) for i in range(10)]
    for eid, f in entries[6:]:  # the capped stream still holds the newest 4
        r.xadd(keys.games, f, id=eid)
    _archive(tmp_path / "live", entries[:8])  # the archive holds the oldest 8 (2 also in the stream)
    base = ["--redis", "fake://", "--run", "live", "--runs-dir", str(tmp_path)]
    ids = lambda out: [line.split("│")[2].strip() for line in out.splitlines() if "_0 " in line]
    assert cli_main(["games", "list", *base, "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert ids(out) == ["3007_0", "3008_0", "3009_0"] and "from the games stream" in out
    assert cli_main(["games", "list", *base, "--count", "7"]) == 0
    assert ids(capsys.readouterr().out) == [f"{3000 + i}_0" for i in range(3, 10)]
    assert cli_main(["games", "list", *base, "--all"]) == 0
    out = capsys.readouterr().out
    assert ids(out) == [f"{3000 + i}_0" for i in range(10)] and "6 from the archive" in out
    assert cli_main(["games", "list", *base, "--all", "--source", "stream"]) == 0
    assert ids(capsys.readouterr().out) == [f"{3000 + i}_0" for i in range(6, 10)]
    assert cli_main(["games", "list", *base, "--all", "--source", "archive"]) == 0
    assert ids(capsys.readouterr().out) == [f"{3000 + i}_0" for i in range(8)]
