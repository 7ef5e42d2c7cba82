"""``keisei usi``: the protocol dialogue over pipes, special answers (win/resign/ponder/mate),
and complete games driven by cshogi's USI client (``python -m cshogi.cli``, which uses
``cshogi.usi.Engine``) and by the evaluation referee."""

from __future__ import annotations

import os
import subprocess
import sys

import cshogi
import pytest

from keisei_stream.play.engine import parse_position, value_to_cp
from keisei_stream.play.match import play_match


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from keisei_stream.rl.checkpoint import save_checkpoint
    from keisei_stream.config import config_from_dict
    from keisei_stream.rl.model import build_model

    cfg = config_from_dict({"model": {"channels": 8, "blocks": 1, "value_hidden": 16, "policy_planes": 1},
                            "env": {"max_plies": 80}})
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("usi") / "ckpt_00000002.pt"
    save_checkpoint(path, model=build_model(cfg.model), optimizer=None, scheduler=None, version=2, updates=2,
                    config_json=cfg.to_json())
    return path


def engine_cmd(ckpt, *extra):
    return [sys.executable, "-m", "keisei_stream.cli", "usi", "--checkpoint", str(ckpt), *extra]


def talk(ckpt, lines, *extra, timeout=60):
    p = subprocess.run(engine_cmd(ckpt, *extra), input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def bestmoves(out):
    return [line.split()[1] for line in out if line.startswith("bestmove")]


def test_protocol_dialogue(ckpt):
    out = talk(ckpt, [
        "usi", "setoption name Temperature value 0", "setoption name USI_Hash value 256", "isready",
        "usinewgame", "some unknown command", "position startpos moves 7g7f 3c3d",
        "go btime 1000 wtime 1000 byoyomi 1000", "position startpos", "go infinite", "stop",
        "go ponder", "ponderhit", "go nodes 100", "go depth 3", "go movetime 50", "go btime 100 wtime 100 binc 10 winc 10",
        "go mate 1000", "gameover win", "quit", "go",  # nothing after quit is answered
    ])
    assert out[0].startswith("id name keisei-stream") and out[1].startswith("id author")
    assert any(line.startswith("option name Temperature type string") for line in out)
    assert any(line.startswith("option name Device type string") for line in out)
    assert out.index("usiok") < out.index("readyok")
    moves = bestmoves(out)
    assert len(moves) == 7
    b = cshogi.Board()
    b.push_usi("7g7f")
    b.push_usi("3c3d")
    assert b.is_legal(b.move_from_usi(moves[0]))
    for m in moves[1:]:
        assert cshogi.Board().is_legal(cshogi.Board().move_from_usi(m))
    assert "checkmate notimplemented" in out
    assert sum(line.startswith("info depth 1") and " pv " in line for line in out) == 7


def test_ponder_is_held_until_stop(ckpt):
    out = talk(ckpt, ["usi", "isready", "position startpos", "go ponder", "isready", "stop", "quit"])
    i_ready2 = [i for i, line in enumerate(out) if line == "readyok"][1]
    i_best = [i for i, line in enumerate(out) if line.startswith("bestmove")][0]
    assert i_ready2 < i_best  # no bestmove before stop


def test_win_resign_and_bad_positions(ckpt):
    nyugyoku = "K+P+P+P+P+P+P+P1/+P+P+P6/9/9/9/9/9/9/8k b RB2G2S2N2L2P 1"
    mated = "8k/8G/8P/9/9/9/9/9/K8 w - 1"  # White to move, mated
    out = talk(ckpt, ["usi", "isready", f"position sfen {nyugyoku}", "go byoyomi 100",
                      f"position sfen {mated}", "go byoyomi 100",
                      "position startpos moves 7g7f 7g7f", "go byoyomi 100",
                      "position sfen garbage", "go byoyomi 100", "quit"])
    moves = bestmoves(out)
    assert moves[:2] == ["win", "resign"]
    assert any("illegal move '7g7f'" in line for line in out)
    b = cshogi.Board()
    b.push_usi("7g7f")
    assert b.is_legal(b.move_from_usi(moves[2]))  # position kept before the bad move
    assert any(line.startswith("info string bad") for line in out) and cshogi.Board().is_legal(cshogi.Board().move_from_usi(moves[3]))


def test_parse_position_and_cp():
    b, start, moves, err = parse_position("sfen lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1 moves 7g7f".split())
    assert err is None and moves == ["7g7f"] and b.turn == cshogi.WHITE
    assert value_to_cp(0.0) == 0 and value_to_cp(-0.5) == -value_to_cp(0.5)
    assert value_to_cp(0.5) == round(600 * __import__("math").log(3))  # p = 0.75
    assert 0 < value_to_cp(1.0) <= 30000


def test_missing_checkpoint_exits_2(tmp_path):
    p = subprocess.run(engine_cmd(tmp_path / "none.pt"), input="usi\nquit\n", capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_complete_games_under_cshogi_cli(ckpt, tmp_path):
    """cshogi's match runner (cshogi.usi.Engine) plays 2 complete games: keisei (Temperature 1)
    vs keisei (argmax), a draw limit of 40 moves, CSA records written and parsed back."""
    script = tmp_path / "keisei_engine.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m keisei_stream.cli usi --checkpoint {ckpt} \"$@\"\n")
    script.chmod(0o755)
    csa_dir = tmp_path / "csa"
    csa_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "cshogi.cli", str(script), str(script), "--games", "2",
                        "--byoyomi", "100", "--draw", "40", "--keep-process", "--options1", "Temperature:1.0",
                        "--csa", str(csa_dir)], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 of 2 games finished." in p.stdout
    files = sorted(csa_dir.glob("*.csa"))
    assert files
    from cshogi import CSA

    for f in files:
        for game in CSA.Parser.parse_file(str(f)):
            b = cshogi.Board()
            for m in game.moves:
                assert b.is_legal(m)
                b.push(m)
            assert len(game.moves) >= 1


def test_engine_under_the_referee(ckpt):
    spec = f"usi:{sys.executable} -m keisei_stream.cli usi --checkpoint {ckpt} --temperature 1;go=go byoyomi 100"
    res = play_match(spec, "random", games=2, max_plies=40, progress=False)
    assert res.games == 2
    assert "illegal" not in res.reasons and "crash" not in res.reasons and "timeout" not in res.reasons
    assert res.name_a.startswith("keisei-stream")
