"""Matches: the referee's rulings, colour alternation, paired openings, determinism across
processes, misbehaving USI engines (crash, hang, illegal move) losing games while the match goes
on, model players from checkpoint files and from Redis, continuous evaluation into the eval
stream and the Elo hash."""

from __future__ import annotations

import json
import sys
import textwrap

import cshogi
import pytest

from keisei_stream.cli.main import main as cli_main
from keisei_stream.play.evaluation import baselines, follow, specs
from keisei_stream.play.evaluation.baselines import GreedyPlayer, RandomPlayer, move_gains
from keisei_stream.play.evaluation.match import play_game, play_match
from keisei_stream.play.evaluation.specs import make_player, parse_spec
from keisei_stream.play.players import SpecError
from keisei_stream.wire import client

from tests.helpers import Scripted

FAKE_ENGINE = textwrap.dedent('''
    import random, sys, time
    import cshogi
    mode = sys.argv[1]
    board = cshogi.Board()
    gos = 0
    rng = random.Random(0)
    def say(s):
        sys.stdout.write(s + "\\n"); sys.stdout.flush()
    for line in sys.stdin:
        t = line.split()
        if not t:
            continue
        if t[0] == "usi":
            say("id name fake-" + mode); say("usiok")
        elif t[0] == "isready":
            say("readyok")
        elif t[0] == "position":
            board = cshogi.Board()
            if t[1] == "sfen":
                board.set_sfen(" ".join(t[2:6]))
            if "moves" in t:
                for m in t[t.index("moves") + 1:]:
                    board.push_usi(m)
        elif t[0] == "go":
            gos += 1
            if mode == "crash" and gos >= 3:
                sys.exit(3)
            if mode == "hang" and gos >= 2:
                time.sleep(600)
            if mode == "illegal" and gos >= 2:
                say("bestmove 1a1b"); continue
            if mode == "garbage" and gos >= 2:
                say("bestmove"); continue
            moves = list(board.legal_moves)
            say("bestmove " + (cshogi.move_to_usi(rng.choice(moves)) if moves else "resign"))
        elif t[0] == "quit":
            break
''')


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("engines") / "fake_usi.py"
    path.write_text(FAKE_ENGINE)
    return path


def usi_spec(engine, mode, **opts):
    extra = "".join(f";{k}={v}" for k, v in opts.items())
    return f"usi:{sys.executable} {engine} {mode};go=go nodes 1{extra}"


# ------------------------------------------------------------------------------------------------
# players


def test_greedy_prefers_most_valuable_capture_and_promotion():
    # Black bishop on 7g can take the White bishop on 2b with or without promotion: +B wins
    board = cshogi.Board("ln1gkgsnl/1r1s3b1/p1pppp1pp/6p2/1p7/2P4P1/PPBPPPP1P/7R1/LNSGKGSNL b P 10")
    p = GreedyPlayer(seed=1)
    for _ in range(5):
        assert cshogi.move_to_usi(p.choose(board, 0)) == "7g2b+"
    gains = move_gains(__import__("numpy").fromiter(board.legal_moves, dtype="uint32"))
    assert gains.max() == baselines.PIECE_VALUES[cshogi.BISHOP] + (baselines.PIECE_VALUES[13] - baselines.PIECE_VALUES[5])
    # no capture or promotion: any legal move
    start = cshogi.Board()
    moves = {cshogi.move_to_usi(GreedyPlayer(seed=s).choose(start, 0)) for s in range(20)}
    assert len(moves) > 3 and all(start.is_legal(start.move_from_usi(m)) for m in moves)


def test_random_player_is_legal_and_seeded():
    b = cshogi.Board()
    a = [RandomPlayer(seed=3).choose(b, 0) for _ in range(3)]
    assert len(set(a)) == 1 and b.is_legal(a[0])


def test_spec_parsing():
    ps = parse_spec("usi:/bin/engine -x 1;go=go depth 3;option.Threads=2;timeout=5")
    assert ps.kind == "usi" and ps.body == "/bin/engine -x 1"
    assert ps.options == {"go": "go depth 3", "option.Threads": "2", "timeout": "5"}
    assert specs.parse_redis_body("unix:///tmp/r.sock#run1@12") == ("unix:///tmp/r.sock", "run1", "12")
    assert specs.parse_redis_body("redis://h:6379/0#r") == ("redis://h:6379/0", "r", "latest")
    for bad in ("", "bogus", "random:x", "checkpoint:", "usi:x;novalue", "redis:nohash"):
        with pytest.raises(SpecError):
            p = parse_spec(bad)
            if p.kind == "redis":
                specs.parse_redis_body(p.body)
    with pytest.raises(SpecError):
        make_player("usi:engine;bogus=1")
    with pytest.raises(SpecError):
        make_player("checkpoint:/nonexistent/ckpt.pt")
    p = make_player("usi:engine --flag;go=go byoyomi 100")
    assert p.command == ["engine", "--flag"] and p.go == "go btime 0 wtime 0 byoyomi 100"
    assert p.timeout_s == pytest.approx(5.3)


# ------------------------------------------------------------------------------------------------
# the referee


def test_referee_rulings():
    r = play_game(Scripted(["4h5h", "5h4h"]), Scripted(["5a4a", "4a5a"]), start_sfen="4k4/9/9/9/9/9/9/5R3/K8 b - 1")
    assert (r["reason"], r["result"], r["plies"]) == ("perpetual_check", -1, 12)  # the checker loses
    r = play_game(Scripted(["2h1h", "1h2h"]), Scripted(["8b9b", "9b8b"]))
    assert (r["reason"], r["result"], r["plies"]) == ("repetition", 0, 12)  # 4th occurrence
    nyugyoku = "K+P+P+P+P+P+P+P1/+P+P+P6/9/9/9/9/9/9/8k b RB2G2S2N2L2P 1"
    r = play_game(Scripted(["1a1b"]), Scripted(["1i1h"]), start_sfen=nyugyoku)
    assert (r["reason"], r["result"]) == ("entering_king", 1)
    r = play_game(Scripted(["win"]), Scripted(["3c3d"]))
    assert (r["reason"], r["result"]) == ("illegal", -1) and "declaration" in r["detail"]
    r = play_game(Scripted(["7g7f"]), Scripted(["resign"]))
    assert (r["reason"], r["result"], r["moves"]) == ("resign", 1, ["7g7f"])
    r = play_game(Scripted(["7g7f", "1a1b"]), Scripted(["3c3d"]))
    assert (r["reason"], r["result"], r["plies"]) == ("illegal", -1, 2) and "1a1b" in r["detail"]
    r = play_game(Scripted(["7g7f", "zz"]), Scripted(["3c3d"]))
    assert r["reason"] == "illegal"
    # a promotion outside the promotion zone (cshogi's is_legal would take it): illegal, as text
    # or as a cshogi move code
    r = play_game(Scripted(["2g2f+"]), Scripted(["3c3d"]))
    assert (r["reason"], r["result"], r["plies"]) == ("illegal", -1, 0) and "2g2f+" in r["detail"]

    class Code:
        name = "code"

        def new_game(self, *args):
            pass

        def choose(self, board, ply):
            return board.move_from_usi("2g2f+")

    r = play_game(Code(), Scripted(["3c3d"]))
    assert (r["reason"], r["plies"], r["detail"]) == ("illegal", 0, "illegal move '2g2f+'")
    # fool's-mate style: Black mates White
    mate = ["7g7f", "5a4b", "8h3c+", "4b5b", "3c4c"]
    r = play_game(Scripted(mate[0::2]), Scripted(mate[1::2]), start_sfen="4k4/9/9/9/9/9/9/1B7/4K4 b G 1")
    assert r["plies"] <= 5
    r = play_game(Scripted(["2h1h", "1h2h"]), Scripted(["8b9b", "9b8b"]), max_plies=6)
    assert (r["reason"], r["result"], r["plies"]) == ("max_plies", 0, 6)


def test_checkmate_ends_game():
    # White king 1a boxed in; Black gold drop on 1b is mate (protected by the pawn on 1c)
    start = "8k/9/8P/9/9/9/9/9/K8 b G 1"
    r = play_game(Scripted(["G*1b"]), Scripted(["1a2a"]), start_sfen=start)
    assert (r["reason"], r["result"], r["moves"]) == ("checkmate", 1, ["G*1b"])


# ------------------------------------------------------------------------------------------------
# matches


def test_match_colours_openings_and_determinism():
    a = play_match("greedy", "random", games=6, opening_plies=4, processes=1, max_plies=120, seed=5, progress=False)
    assert a.wins + a.losses + a.draws == 6
    assert [r["a_color"] for r in a.records] == ["black", "white"] * 3
    for i in range(0, 6, 2):
        assert a.records[i]["moves"][:4] == a.records[i + 1]["moves"][:4]
        assert a.records[i]["opening_plies"] == 4
    assert a.records[0]["moves"][:4] != a.records[2]["moves"][:4]
    for r in a.records:
        assert r["a_result"] == (r["result"] if r["a_color"] == "black" else -r["result"])
    b = play_match("greedy", "random", games=6, opening_plies=4, processes=2, max_plies=120, seed=5, progress=False)
    assert [r["moves"] for r in a.records] == [r["moves"] for r in b.records]
    d = a.to_dict()
    json.dumps(d)
    assert d["games"] == 6 and len(d["records"]) == 6
    assert a.summary().startswith("greedy vs random: ")


def test_greedy_beats_random():
    res = play_match("greedy", "random", games=10, max_plies=256, progress=False)
    assert res.score > 0.5 and res.elo > 0


def test_misbehaving_engines_lose_and_match_goes_on(fake_engine):
    crash = play_match(usi_spec(fake_engine, "crash"), "random", games=3, progress=False)
    assert crash.losses == 3 and crash.reasons == {"crash": 3}
    assert all("exited" in r["detail"] or "closed" in r["detail"] for r in crash.records)
    hang = play_match(usi_spec(fake_engine, "hang", timeout=0.5), "random", games=2, progress=False)
    assert hang.losses == 2 and hang.reasons == {"timeout": 2}
    illegal = play_match(usi_spec(fake_engine, "illegal"), "random", games=2, progress=False)
    assert illegal.losses == 2 and illegal.reasons == {"illegal": 2}
    assert all(r["plies"] <= 3 for r in illegal.records)
    garbage = play_match("random", usi_spec(fake_engine, "garbage"), games=2, progress=False)
    assert garbage.wins == 2 and garbage.reasons == {"illegal": 2}
    missing = play_match("random", "usi:/nonexistent/engine", games=2, progress=False)
    assert missing.wins == 2 and missing.reasons == {"crash": 2}
    assert all(r["plies"] == 0 and "cannot start" in r["detail"] for r in missing.records)


def test_usi_engine_plays_whole_games(fake_engine):
    res = play_match(usi_spec(fake_engine, "random", name="rnd"), "greedy", games=2, processes=2,
                     max_plies=100, progress=False)
    assert res.games == 2 and res.name_a == "rnd"
    assert set(res.reasons) <= {"checkmate", "max_plies", "repetition", "perpetual_check", "entering_king"}
    for r in res.records:
        b = cshogi.Board()
        for m in r["moves"]:
            assert b.is_legal(b.move_from_usi(m))
            b.push_usi(m)


def test_cli_eval_json(tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cli_main(["eval", "--player", "greedy", "--opponent", "random", "--games", "4", "--json", str(out),
                          "--no-progress", "--max-plies", "80", "--opening-plies", "2"])
    assert rc == 0
    assert "greedy vs random: " in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["games"] == 4 and d["wins"] + d["losses"] + d["draws"] == 4
    assert cli_main(["eval", "--opponent", "random", "--games", "2", "--no-progress"]) == 2
    assert cli_main(["eval", "--player", "nonsense", "--games", "2", "--no-progress"]) == 2


# ------------------------------------------------------------------------------------------------
# model players, Redis and continuous evaluation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from keisei_stream.rl.checkpoint import save_checkpoint
    from keisei_stream.config import config_from_dict
    from keisei_stream.rl.model import build_model

    cfg = config_from_dict({"model": {"channels": 8, "blocks": 1, "value_hidden": 16, "policy_planes": 1},
                            "env": {"max_plies": 60},
                            "eval": {"games": 2, "every_versions": 2, "opponents": ["random", "greedy"]}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_00000001.pt"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, version=1, updates=1,
                    config_json=cfg.to_json())
    return cfg, model, path


def test_checkpoint_player_match(tiny):
    cfg, _, path = tiny
    res = play_match(f"checkpoint:{path}", "random", games=2, max_plies=40, progress=False)
    assert res.games == 2 and res.name_a == "ckpt_00000001"
    t1 = play_match(f"checkpoint:{path};temperature=1.0", "random", games=2, max_plies=30, seed=1, progress=False)
    t2 = play_match(f"checkpoint:{path};temperature=1.0", "random", games=2, max_plies=30, seed=1, progress=False)
    assert [r["moves"] for r in t1.records] == [r["moves"] for r in t2.records]


def _publish(r, keys, model, version):
    from keisei_stream.rl.checkpoint import weights_to_bytes
    from keisei_stream.wire.weights import publish_weights

    return publish_weights(r, keys, version, weights_to_bytes(model), "float32", keep=4)


def test_follow_writes_eval_stream_and_elo_table(tiny, monkeypatch, tmp_path):
    fakeredis = pytest.importorskip("fakeredis")
    from keisei_stream.wire.keys import Keys

    cfg, model, _ = tiny
    r = fakeredis.FakeRedis()
    monkeypatch.setattr(client, "connect", lambda url, **kw: r)
    keys = Keys("t1")
    r.set(keys.config, cfg.to_json())
    assert follow.latest_rating(r, "t1") is None
    _publish(r, keys, model, 1)
    assert follow.follow("fake://", "t1", max_evals=0, progress=False) == 0
    sha = _publish(r, keys, model, 2)
    # an exact version and the latest both resolve
    p = make_player("redis:fake://#t1@2")
    assert p.name == "t1@v2" and p.meta["sha256"] == sha
    assert make_player("redis:fake://#t1").meta["version"] == 2
    assert make_player(f"redis:fake://#t1@sha256:{sha}").meta["version"] == 2
    with pytest.raises(SpecError):
        make_player("redis:fake://#t1@sha256:abc")
    with pytest.raises(SpecError):
        make_player("redis:fake://#t1@7")
    n = follow.follow("fake://", "t1", max_evals=1, poll_s=0.01, progress=False, runs_dir=tmp_path)
    assert n == 1
    entries = r.xrange(keys.eval)
    assert [e[1][b"opponent"] for e in entries] == [b"random", b"greedy"]
    f = entries[0][1]
    for k in (b"version", b"games", b"wins", b"losses", b"draws", b"score", b"elo", b"elo_lo", b"elo_hi"):
        assert k in f
    assert int(f[b"version"]) == 2 and int(f[b"games"]) == 2
    h = r.hgetall(follow.elo_key("t1"))
    assert int(h[b"last_version"]) == 2 and b"anchor:greedy" in h and b"v:00000002" in h
    rating = follow.latest_rating(r, "t1")
    assert rating["version"] == 2 and "random" in rating["vs"]
    assert [row["version"] for row in follow.elo_table(r, "t1")] == [2]
    # version 3 is not due (every 2); a restart resumes from last_version
    _publish(r, keys, model, 3)
    r.set(keys.control, "stop")
    assert follow.follow("fake://", "t1", max_evals=1, poll_s=0.01, progress=False) == 0
    # the saved files: one line per eval entry, the Elo table, the Elo curve in TensorBoard
    lines = [json.loads(x) for x in (tmp_path / "t1" / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [(x["version"], x["opponent"]) for x in lines] == [(2, "random"), (2, "greedy")]
    assert [x["id"] for x in lines] == [e[0].decode() for e in entries]
    assert lines[0]["sha256"] == sha and lines[0]["games"] == 2 and isinstance(lines[0]["score"], float)
    assert lines[0]["wins"] + lines[0]["losses"] + lines[0]["draws"] == 2
    saved = json.loads((tmp_path / "t1" / "eval" / "elo_table.json").read_text())
    assert saved["run"] == "t1" and saved["last_version"] == 2 and "greedy" in saved["anchors"]
    assert saved["versions"] == follow.elo_table(r, "t1")
    assert follow.saved_latest_rating(tmp_path / "t1" / "eval")["version"] == 2
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "t1" / "tensorboard"))
    acc.Reload()
    assert {"elo/random", "elo/greedy", "elo/combined", "score/greedy"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("elo/random")] == [(2, pytest.approx(lines[0]["rating"]))]


def _rating(version: int, elo: float) -> dict:
    return {"version": version, "elo": elo, "elo_lo": elo - 50, "elo_hi": None, "games": 4, "time": 0.0,
            "matches": {"random": {"wins": 3, "losses": 1, "draws": 0, "score": 0.75, "elo": elo,
                                   "elo_lo": elo - 50, "elo_hi": None, "anchor": 0.0}}}


def test_eval_table_without_redis_reads_the_saved_table(tmp_path, monkeypatch, capsys):
    """`keisei eval --table` after the run's Redis is gone: the saved table; with a Redis, its
    versions joined with those only the file still has (a resumed run with a fresh Redis)."""
    fakeredis = pytest.importorskip("fakeredis")

    assert cli_main(["eval", "--table", "--run", "gone", "--runs-dir", str(tmp_path)]) == 1
    assert "no Elo table" in capsys.readouterr().err
    r = fakeredis.FakeRedis()
    r.hset(follow.elo_key("gone"), mapping={"v:00000001": json.dumps(_rating(1, 10.0)),
                                            "anchor:greedy": json.dumps({"elo": 80.0, "elo_lo": 40.0, "elo_hi": 120.0})})
    files = follow.EvalFiles(tmp_path / "gone", "gone", tensorboard=False)
    files.save_table(r)
    r.flushall()  # a new Redis: the table lives on in the file
    r.hset(follow.elo_key("gone"), "v:00000003", json.dumps(_rating(3, 30.0)))
    data = files.save_table(r, _rating(3, 30.0))
    assert [v["version"] for v in data["versions"]] == [1, 3] and data["anchors"]["greedy"]["elo"] == 80.0
    assert cli_main(["eval", "--table", "--run", "gone", "--runs-dir", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "2 evaluated version(s) saved in" in cap.err and "no --redis given" in cap.err
    assert "10.0" in cap.out and "30.0" in cap.out and "random: 3-1-0" in cap.out
    r.flushall()
    r.hset(follow.elo_key("gone"), "v:00000004", json.dumps(_rating(4, 40.0)))
    monkeypatch.setattr(client, "connect", lambda url, **kw: r)
    assert cli_main(["eval", "--table", "--run", "gone", "--runs-dir", str(tmp_path), "--redis", "fake://"]) == 0
    cap = capsys.readouterr()
    assert "from the Redis at fake:// and 2 version(s) saved" in cap.err
    assert all(x in cap.out for x in ("10.0", "30.0", "40.0"))


def test_eval_files_without_tensorboard_warn_and_still_save(tmp_path, monkeypatch):
    import io
    import sys

    from rich.console import Console

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    out = io.StringIO()
    files = follow.EvalFiles(tmp_path / "x", "x", console=Console(file=out, width=200))
    fields = {"version": 5, "opponent": "checkpoint:/a/b.pt", "games": 2, "wins": 2, "losses": 0, "draws": 0,
              "score": "1.0000", "elo": "inf", "elo_lo": "12.500", "elo_hi": "inf", "los": "0.9", "rating": "inf",
              "rating_lo": "12.500", "rating_hi": "inf", "time": "1.5"}
    line = files.add_entry(b"1-0", "ab" * 32, fields)
    files.add_entry("2-0", "ab" * 32, fields)
    assert out.getvalue().count("tensorboard is not installed") == 1
    assert line["elo"] is None and line["elo_lo"] == 12.5 and line["version"] == 5 and line["id"] == "1-0"
    assert len((tmp_path / "x" / "eval" / "eval.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "x" / "tensorboard").exists()
    assert follow._tag("checkpoint:/a/b.pt") == "checkpoint__a_b.pt"


# ------------------------------------------------------------------------------------------------
# searching players: search:PATH;nodes=N, checkpoint/redis specs with nodes=


def test_search_specs(tiny):
    from keisei_stream.play.engine.search_player import SearchPlayer

    cfg, _, path = tiny
    ps = parse_spec(f"search:{path};nodes=8;batch_size=4")
    assert ps.kind == "search" and ps.body == str(path) and ps.options == {"nodes": "8", "batch_size": "4"}
    with pytest.raises(SpecError):
        parse_spec("search:")
    p = make_player(f"search:{path};nodes=8;batch_size=4")
    assert isinstance(p, SearchPlayer) and p.nodes == 8 and p.mcts.batch_size == 4
    assert p.name == "ckpt_00000001+search8" and p.mcts.max_plies == cfg.env.max_plies
    assert make_player(f"search:{path}").nodes == 800  # the default
    q = make_player(f"checkpoint:{path};nodes=4;name=s4")  # a model spec with nodes= searches
    assert isinstance(q, SearchPlayer) and q.nodes == 4 and q.name == "s4"
    t = make_player(f"search:{path};time_limit=0.05")
    assert t.nodes is None and t.time_limit == 0.05
    assert make_player(f"search:{path};nodes=4", temperature=0.5).mcts.options.temperature == 0.5
    assert not isinstance(make_player(f"checkpoint:{path}"), SearchPlayer)
    for bad in (f"search:{path};bogus=1", f"search:{path};nodes=many", f"search:{path};batch_size=0",
                "search:/nonexistent/ckpt.pt;nodes=4"):
        with pytest.raises(SpecError):
            make_player(bad)


def test_search_against_raw_policy_match_and_cli(tiny, capsys):
    _, _, path = tiny
    res = play_match(f"search:{path};nodes=8;batch_size=4", f"checkpoint:{path}", games=2, max_plies=30,
                     opening_plies=2, progress=False)
    assert res.games == 2 and res.name_a == "ckpt_00000001+search8" and res.name_b == "ckpt_00000001"
    assert not {"illegal", "crash", "timeout"} & set(res.reasons)
    rc = cli_main(["eval", "--player", f"search:{path};nodes=4;batch_size=4", "--opponent", f"checkpoint:{path}",
                   "--games", "2", "--max-plies", "20", "--no-progress"])
    assert rc == 0 and "ckpt_00000001+search4 vs ckpt_00000001: " in capsys.readouterr().out
    assert cli_main(["eval", "--player", f"search:{path};nodes=x", "--games", "2", "--no-progress"]) == 2


def test_redis_version_with_search(tiny, monkeypatch):
    fakeredis = pytest.importorskip("fakeredis")
    from keisei_stream.play.engine.search_player import SearchPlayer
    from keisei_stream.wire.keys import Keys

    cfg, model, _ = tiny
    r = fakeredis.FakeRedis()
    monkeypatch.setattr(client, "connect", lambda url, **kw: r)
    keys = Keys("t2")
    r.set(keys.config, cfg.to_json())
    _publish(r, keys, model, 3)
    p = make_player("redis:fake://#t2@3;nodes=6;batch_size=2")
    assert isinstance(p, SearchPlayer) and p.name == "t2@v3+search6" and p.meta["version"] == 3
    assert p.choose(cshogi.Board(), 0) in set(cshogi.Board().legal_moves)
    raw = make_player("redis:fake://#t2@3")
    assert raw.name == "t2@v3" and not isinstance(raw, SearchPlayer)
