"""``keisei usi``: the engine with tree search, driven in-process (:class:`UsiEngine` with a
recording output stream: exact ordering and timing of ``info``/``bestmove``) and as a subprocess
over pipes (the CLI, a clock kept like a server's), and complete games under cshogi's USI client
(``python -m cshogi.cli``, which uses ``cshogi.usi.Engine``, with ponder) and the evaluation
referee. Small random-init net (configs/tiny.yaml)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time

import cshogi
import numpy as np
import pytest

from keisei_stream.play.engine.protocol import parse_go, parse_position, time_budget_ms, value_to_cp
from keisei_stream.play.engine.tree import SearchLimits
from keisei_stream.play.engine.usi_job import SearchJob
from keisei_stream.play.engine.usi_server import UsiEngine
from keisei_stream.play.evaluation.match import play_match
from keisei_stream.shogi import EndReason, random_opening

from tests.conftest import ROOT

#: Mate in 1 for Black: G*5b (the pawn on 5c guards the gold).
MATE1_SFEN = "4k4/9/4P4/9/9/9/9/9/4K4 b G 1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from keisei_stream.config import load_config
    from keisei_stream.rl.checkpoint import save_checkpoint
    from keisei_stream.rl.model import build_model

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("usi") / "ckpt_00000002.pt"
    save_checkpoint(path, model=build_model(cfg.model), optimizer=None, scheduler=None, version=2, updates=2,
                    config_json=cfg.to_json())
    return path


# ------------------------------------------------------------------------------------------------
# in-process engine


class Out:
    """A text stream that records every complete line with the time it was written (thread-safe)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._buf = ""
        self._cond = threading.Condition()

    def write(self, s: str) -> int:
        with self._cond:
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self.lines.append((time.perf_counter(), line))
            self._cond.notify_all()
        return len(s)

    def flush(self) -> None:
        pass

    def text(self) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines]

    def count(self, prefix: str) -> int:
        return sum(line.startswith(prefix) for line in self.text())

    def wait(self, prefix: str, after: int = 0, timeout: float = 30.0) -> tuple[int, float, str]:
        """The first line from index ``after`` on starting with ``prefix``: (index, time, line)."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if self.lines[i][1].startswith(prefix):
                        return i, self.lines[i][0], self.lines[i][1]
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {prefix!r} line within {timeout} s: {self.text()}")
                self._cond.wait(left)


@pytest.fixture
def eng(ckpt):
    out = Out()
    e = UsiEngine(str(ckpt), out, batch_size=4)
    e.handle("setoption name InfoInterval value 100")
    e.handle("isready")  # ByoyomiMargin: the default 300 ms
    assert out.text()[-1] == "readyok"
    yield e, out
    e.close()


def legal_after(moves: list[str], move: str) -> bool:
    b = cshogi.Board()
    for m in moves:
        b.push_usi(m)
    return b.is_legal(b.move_from_usi(move))


def last_info(out: Out, before: int) -> str:
    return [line for line in out.text()[:before] if line.startswith("info depth")][-1]


def test_go_nodes_and_info_line(eng):
    e, out = eng
    e.handle("position startpos moves 7g7f")
    e.handle("go nodes 40")
    i, _, best = out.wait("bestmove")
    tokens = best.split()
    assert len(tokens) == 4 and tokens[2] == "ponder"
    assert legal_after(["7g7f"], tokens[1]) and legal_after(["7g7f", tokens[1]], tokens[3])
    info = last_info(out, i).split()
    for key in ("depth", "seldepth", "nodes", "nps", "time", "score", "pv"):
        assert key in info
    assert int(info[info.index("nodes") + 1]) == 40
    assert info[info.index("score") + 1] == "cp"
    assert info[info.index("pv") + 1: info.index("pv") + 3] == [tokens[1], tokens[3]]


def test_default_nodes_and_depth(eng):
    e, out = eng
    e.handle("setoption name Nodes value 24")
    e.handle("position startpos")
    e.handle("go depth 3")  # no time, no nodes: Nodes simulations
    i, _, _ = out.wait("bestmove")
    assert " nodes 24 " in last_info(out, i)


def test_tree_is_reused_when_the_position_extends(eng):
    e, out = eng
    e.handle("position startpos")
    e.handle("go nodes 200")
    _, _, best = out.wait("bestmove")
    move, reply = best.split()[1], best.split()[3]
    e.handle(f"position startpos moves {move} {reply}")
    n = len(out.lines)
    e.handle("go nodes 8")
    out.wait("bestmove", after=n)
    assert e.mcts.root.n_sum > 8  # visits of the subtree searched before, plus the 8 new ones
    e.handle("position startpos moves 2g2f")  # not an extension of the last search: fresh tree
    n = len(out.lines)
    e.handle("go nodes 8")
    out.wait("bestmove", after=n)
    assert e.mcts.root.n_sum == 8


def test_go_movetime(eng):
    e, out = eng
    e.handle("position startpos")
    t = time.perf_counter()
    e.handle("go movetime 600")  # 600 ms - ByoyomiMargin 300
    _, tb, _ = out.wait("bestmove")
    assert 0.25 <= tb - t < 0.6


def test_go_byoyomi_stays_within_byoyomi(eng):
    e, out = eng
    e.handle("position startpos moves 7g7f 3c3d")
    t = time.perf_counter()
    e.handle("go btime 0 wtime 0 byoyomi 600")  # 600 ms - ByoyomiMargin 300
    i, tb, _ = out.wait("bestmove")
    assert 0.25 <= tb - t < 0.6
    assert out.count("info depth") >= 3  # every InfoInterval (100 ms) and at the end


def test_go_btime_wtime_uses_the_side_to_moves_clock(eng):
    e, out = eng
    # White to move at move 2: 3000 / (14 + 28) + 0 = 71 ms (Black's 100 ms would give 2 ms)
    e.handle("position startpos moves 7g7f")
    t = time.perf_counter()
    e.handle("go btime 100 wtime 3000 binc 0 winc 0")
    i, tb, _ = out.wait("bestmove")
    assert 0.04 <= tb - t < 1.0  # far within White's 3 s
    # no time left at all (and no byoyomi): the network's move without search, at once
    n = len(out.lines)
    t = time.perf_counter()
    e.handle("go btime 0 wtime 0")
    _, tb, best = out.wait("bestmove", after=n)
    assert tb - t < 0.5 and legal_after(["7g7f"], best.split()[1])


def test_time_budget():
    # python-dlshogi2's share of the remaining time, plus the increment
    assert time_budget_ms(60_000, 0, 0, 1, 300) == pytest.approx(60_000 / 43)
    assert time_budget_ms(60_000, 1_000, 0, 40, 300) == pytest.approx(60_000 / 14 + 1_000)
    # byoyomi: at least the byoyomi less the margin
    assert time_budget_ms(0, 0, 1_000, 50, 300) == 700
    assert time_budget_ms(5_000, 0, 1_000, 50, 300) == 1_000 - 300
    assert time_budget_ms(20_000, 0, 1_000, 50, 300) == pytest.approx(20_000 / 14)
    # the increment is not spendable yet: never more than remaining + byoyomi - margin
    assert time_budget_ms(500, 5_000, 0, 50, 300) == 250  # margin cut to half of 500
    assert time_budget_ms(2_000, 5_000, 0, 50, 300) == 1_700
    # a margin larger than half the time keeps only half; nothing at all gives 0
    assert time_budget_ms(0, 0, 100, 1, 300) == 50
    assert time_budget_ms(0, 0, 0, 1, 300) == 0
    for rem in (0, 10, 100, 1_000, 10_000, 600_000):
        for byo in (0, 100, 1_000, 10_000):
            for inc in (0, 1_000):
                for margin in (0, 300, 5_000):
                    b = time_budget_ms(rem, inc, byo, 30, margin)
                    assert 0 <= b <= rem + byo - min(margin, (rem + byo) / 2)


def test_parse_go():
    g, problems = parse_go("ponder btime 10 wtime 20 binc 1 winc 2 byoyomi 3 nodes 4".split())
    assert g.ponder and not g.infinite and (g.btime, g.wtime, g.binc, g.winc, g.byoyomi, g.nodes) == (10, 20, 1, 2, 3, 4)
    assert g.timed() and not problems
    g, problems = parse_go("btime x nodes -5 foo".split())
    assert g.btime is None and g.nodes is None and len(problems) == 3
    assert not parse_go(["infinite"])[0].timed()
    # the search's limits of a go: the clock from t_start, Nodes when neither nodes nor a clock
    assert parse_go(["depth", "3"])[0].search_limits(cshogi.BLACK, 1, 5.0, 300, 24) == SearchLimits(24, None)
    g = parse_go("btime 0 wtime 0 byoyomi 1000 nodes 7".split())[0]
    assert g.search_limits(cshogi.WHITE, 1, 5.0, 300, 24) == SearchLimits(7, 5.0 + 0.7)


def _job(go: str, sent: list) -> SearchJob:
    return SearchJob(cshogi.Board(), 0, 0, parse_go(go.split())[0], time.perf_counter(), raw=False, send=sent.append)


def _until_stopped(job: SearchJob) -> str:
    assert job.stop.wait(10)
    return "bestmove 2g2f"


def test_search_job_answer_states():
    """SearchJob without an engine: when each command sends, holds or drops the answer."""
    sent: list[str] = []
    job = _job("nodes 5", sent)  # limits: answered when the search ends
    job.start(lambda j: "bestmove 7g7f")
    job.end("finish")
    assert sent == ["bestmove 7g7f"] and not job.running()
    sent.clear()
    job = _job("ponder btime 0 wtime 0 byoyomi 1000", sent)  # ends by itself: held until ponderhit
    job.start(lambda j: "bestmove 7g7f")
    job.thread.join()
    assert sent == [] and job.answer == "bestmove 7g7f"
    job.ponderhit(SearchLimits(1, 2.0))
    job.end("stop")
    assert sent == ["bestmove 7g7f"]  # once
    sent.clear()
    job = _job("ponder btime 0 wtime 0 byoyomi 1000", sent)  # ponderhit while searching: new limits
    hit = threading.Event()
    job.start(lambda j: (hit.wait(10), f"bestmove {j.limits.nodes} {j.limits.deadline}")[1])
    limits = job.limits
    job.ponderhit(SearchLimits(3, 4.5))
    assert job.limits is limits and not job.hold
    hit.set()
    job.end("finish")
    assert sent == ["bestmove 3 4.5"]
    for how, answered in (("stop", True), ("finish", True), ("replace", False)):
        sent.clear()
        job = _job("infinite", sent)
        job.start(_until_stopped)
        job.ponderhit(SearchLimits(1, 0.0))  # not a ponder search: ignored
        assert job.hold and job.limits == SearchLimits()
        job.end(how)
        assert sent == (["bestmove 2g2f"] if answered else []) and job.discard == (not answered), how


def test_infinite_until_stop(eng):
    e, out = eng
    e.handle("position startpos")
    e.handle("go infinite")
    time.sleep(0.6)
    assert out.count("bestmove") == 0 and out.count("info depth") >= 2
    n = len(out.lines)
    e.handle("isready")  # answered at once while the search runs
    assert "readyok" in out.text()[n:]
    n = len(out.lines)
    e.handle("stop")  # returns once the search thread has answered
    assert out.count("bestmove") == 1
    i, _, best = out.wait("bestmove", after=n)
    assert legal_after([], best.split()[1])
    assert int(last_info(out, i).split()[6]) > 16  # "info depth D seldepth S nodes N": N


def test_infinite_holds_the_answer_when_the_search_ends_by_itself(eng):
    e, out = eng
    e.handle(f"position sfen {MATE1_SFEN}")
    e.handle("go infinite")  # the root mate search ends the search at once
    time.sleep(0.3)
    assert out.count("bestmove") == 0
    e.handle("stop")
    assert out.text()[-1] == "bestmove G*5b"
    assert "score mate 1" in out.text()[-2]


def test_ponder_then_ponderhit_uses_the_budget_from_ponderhit(eng):
    e, out = eng
    e.handle("position startpos moves 7g7f 3c3d")
    e.handle("go ponder btime 0 wtime 0 byoyomi 600")
    time.sleep(0.5)
    assert out.count("bestmove") == 0
    t_hit = time.perf_counter()
    e.handle("ponderhit")
    _, tb, best = out.wait("bestmove")
    assert 0.25 <= tb - t_hit < 0.6  # 600 ms byoyomi - 300 ms margin, counted from ponderhit
    assert legal_after(["7g7f", "3c3d"], best.split()[1])


def test_ponder_then_stop(eng):
    e, out = eng
    e.handle("position startpos moves 7g7f 3c3d")
    e.handle("go ponder btime 0 wtime 0 byoyomi 60000")
    time.sleep(0.3)
    assert out.count("bestmove") == 0
    t = time.perf_counter()
    e.handle("stop")
    assert out.count("bestmove") == 1 and time.perf_counter() - t < 1.0


def test_ponderhit_after_a_node_limit_is_met(eng):
    e, out = eng
    e.handle("position startpos")
    e.handle("go ponder nodes 8")  # pondering ignores the limit; from ponderhit it is already met
    time.sleep(0.3)
    assert out.count("bestmove") == 0
    e.handle("ponderhit")
    out.wait("bestmove", timeout=5)


def test_gameover_ends_ponder_and_a_new_go_drops_an_unstopped_search(eng):
    e, out = eng
    e.handle("position startpos")
    e.handle("go ponder btime 0 wtime 0 byoyomi 1000")
    time.sleep(0.2)
    assert out.count("bestmove") == 0
    e.handle("gameover lose")  # ponder ends with its answer (cshogi's client waits for it)
    assert out.count("bestmove") == 1
    e.handle("usinewgame")
    e.handle("position startpos")
    e.handle("go infinite")
    time.sleep(0.2)
    # protocol violation (go without stop): the old search's move is for another position and
    # is never sent; the new go gets its answer
    e.handle("position startpos moves 7g7f")
    n = len(out.lines)
    e.handle("go nodes 8")
    _, _, best = out.wait("bestmove", after=n)
    time.sleep(0.2)
    assert out.count("bestmove") == 2 and legal_after(["7g7f"], best.split()[1])


def test_commands_piped_at_once_wait_for_a_search_with_limits(eng):
    e, out = eng
    for line in ("position startpos", "go nodes 64", "position startpos moves 7g7f", "go nodes 8",
                 "gameover draw"):
        e.handle(line)
    lines = [line for line in out.text() if line.startswith("bestmove")]
    assert len(lines) == 2 and legal_after([], lines[0].split()[1]) and legal_after(["7g7f"], lines[1].split()[1])


def test_raw_policy_mode(eng):
    e, out = eng
    e.handle("setoption name Nodes value 0")
    e.handle("position startpos")
    e.handle("go btime 0 wtime 0 byoyomi 1000")
    _, _, best = out.wait("bestmove")
    assert out.text()[-2].startswith("info depth 1 seldepth 1 nodes 1 ") and len(best.split()) == 2
    n = len(out.lines)
    e.handle("go ponder")
    time.sleep(0.1)
    assert out.count("bestmove") == 1
    e.handle("ponderhit")
    out.wait("bestmove", after=n)


def test_bad_option_values_are_answered_and_ignored(eng):
    e, out = eng
    bad = [
        "setoption name Device value cuda:99", "setoption name Device value tpu", "setoption name Device value",
        "setoption name Nodes value -1", "setoption name Nodes value many", "setoption name Nodes value 1.5",
        "setoption name BatchSize value 0", "setoption name Threads value 0", "setoption name USI_Ponder value maybe",
        "setoption name Temperature value -1", "setoption name Temperature value nan", "setoption name Seed value -3",
        "setoption name ByoyomiMargin value 99999999", "setoption name MateSearchPlies value 11",
        "setoption name InfoInterval value x", "setoption name NoSuchOption value 1", "setoption Nodes 5",
    ]
    before = dict(e.values)
    for line in bad:
        n = len(out.lines)
        assert e.handle(line)
        new = out.text()[n:]
        assert len(new) == 1 and new[0].startswith("info string "), (line, new)
    assert e.values == before
    assert "keeping cpu" in [line for line in out.text() if "cuda:99" in line][0]
    # good values are taken (case-insensitive names), and the engine still plays
    e.handle("setoption name usi_ponder value true")
    e.handle("setoption name MateSearchPlies value 3")
    assert e.values["USI_Ponder"] is True and e.values["MateSearchPlies"] == 3
    e.handle("isready")
    e.handle("position startpos")
    e.handle("go nodes 8")
    _, _, best = out.wait("bestmove")
    assert legal_after([], best.split()[1])


def test_win_resign_mate_and_bad_positions(eng):
    e, out = eng
    nyugyoku = "K+P+P+P+P+P+P+P1/+P+P+P6/9/9/9/9/9/9/8k b RB2G2S2N2L2P 1"
    mated = "8k/8G/8P/9/9/9/9/9/K8 w - 1"  # White to move, mated
    answers = []
    for cmd in (f"position sfen {nyugyoku}", f"position sfen {mated}", f"position sfen {MATE1_SFEN}",
                "position startpos moves 7g7f 7g7f", "position sfen garbage"):
        e.handle(cmd)
        n = len(out.lines)
        e.handle("go nodes 16")
        answers.append(out.wait("bestmove", after=n)[2].split()[1])
    assert answers[:3] == ["win", "resign", "G*5b"]
    assert any("score mate 1 pv G*5b" in line for line in out.text())
    assert any("illegal move '7g7f'" in line for line in out.text())
    assert legal_after(["7g7f"], answers[3])  # position kept before the bad move
    assert any(line.startswith("info string bad") for line in out.text()) and legal_after([], answers[4])


def test_parse_position_and_cp():
    b, start, moves, err = parse_position("sfen lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1 moves 7g7f".split())
    assert err is None and moves == ["7g7f"] and b.turn == cshogi.WHITE
    assert parse_position(["moves"])[3] is not None
    # an illegal move stops the replay: the position before it is kept and said so; a promotion
    # outside the zone is one (cshogi's is_legal alone would accept 2g2f+)
    b, _, moves, err = parse_position("startpos moves 7g7f 3c3d 2g2f+ 8c8d".split())
    assert moves == ["7g7f", "3c3d"] and "illegal move '2g2f+' after 2 moves" in err and b.move_number == 3
    b, _, moves, err = parse_position(f"sfen {BOARD_AT.format(300)} moves 7g7f".split())
    assert err is None and b.move_number == 301  # the SFEN's move number is kept
    assert value_to_cp(0.0) == 0 and value_to_cp(-0.5) == -value_to_cp(0.5)
    assert value_to_cp(0.5) == round(600 * __import__("math").log(3))  # p = 0.75
    assert 0 < value_to_cp(1.0) <= 30000 and value_to_cp(float("nan")) == 0


# ------------------------------------------------------------------------------------------------
# the command over pipes


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
        "usi", "setoption name Temperature value 0", "setoption name USI_Hash value 256",
        "setoption name Threads value 2", "setoption name Device value cuda:99", "isready",
        "usinewgame", "some unknown command", "position startpos moves 7g7f 3c3d",
        "go btime 1000 wtime 1000 byoyomi 200", "position startpos", "go infinite", "stop",
        "go ponder", "ponderhit", "go nodes 100", "go depth 3", "go movetime 50", "go btime 100 wtime 100 binc 10 winc 10",
        "go mate 1000", "gameover win", "quit", "go",  # nothing after quit is answered
    ], "--nodes", "32", "--batch-size", "4")
    assert out[0].startswith("id name keisei-stream") and out[1].startswith("id author")
    for opt in ("Nodes type spin default 32", "BatchSize type spin default 4", "Threads type spin",
                "Device type string", "USI_Ponder type check", "ByoyomiMargin type spin default 300",
                "MateSearchPlies type spin", "Temperature type string"):
        assert any(line.startswith(f"option name {opt}") for line in out), opt
    assert out.index("usiok") < out.index("readyok")
    assert any(line.startswith("info string bad value 'cuda:99' for option Device") for line in out)
    moves = bestmoves(out)
    assert len(moves) == 7
    assert legal_after(["7g7f", "3c3d"], moves[0])
    for m in moves[1:]:
        assert legal_after([], m)
    assert "checkmate notimplemented" in out
    assert sum(line.startswith("info depth") and " pv " in line for line in out) >= 7


def test_cli_errors(ckpt, tmp_path):
    p = subprocess.run(engine_cmd(tmp_path / "none.pt"), input="usi\nquit\n", capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = subprocess.run(engine_cmd(ckpt, "--nodes", "-1"), input="quit\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--nodes -1" in p.stderr
    bad = tmp_path / "ckpt_bad.pt"
    bad.write_bytes(b"not a checkpoint")
    p = subprocess.run(engine_cmd(bad), input="usi\nisready\nquit\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stdout.splitlines()[-1].startswith("info string error: cannot load")
    p = subprocess.run(engine_cmd(ckpt, "--device", "tpu"), input="usi\nisready\nquit\n", capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "unknown device" in p.stdout.splitlines()[-1]


class EnginePipe:
    """``keisei usi`` in a subprocess, spoken to over pipes like a GUI: :meth:`ask` writes lines and
    reads the answer lines (a reader thread, so a silent engine fails the test instead of hanging
    it), timing the last line from the moment the first was written, as a server's clock does."""

    def __init__(self, ckpt, *extra):
        self.proc = subprocess.Popen(engine_cmd(ckpt, *extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, *lines):
        for line in lines:
            self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, *lines, until="bestmove", timeout=60.0) -> tuple[list[str], float]:
        """Send ``lines``; return the lines read up to the one starting with ``until`` (included)
        and the seconds from writing the last line sent to reading that one."""
        self.send(*lines)
        t = time.perf_counter()
        got = []
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"engine closed its output after {got}"
            got.append(line)
            if line.startswith(until):
                return got, time.perf_counter() - t

    def close(self):
        if self.proc.poll() is None:
            self.send("quit")
            try:
                assert self.proc.wait(timeout=30) == 0
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()


@pytest.fixture
def pipe(ckpt):
    p = EnginePipe(ckpt, "--batch-size", "4")
    p.ask("usi", until="usiok")
    p.ask("isready", until="readyok")
    yield p
    p.close()


def info_field(lines: list[str], key: str) -> int:
    """The integer after ``key`` in the last ``info depth`` line of ``lines``."""
    tokens = [line for line in lines if line.startswith("info depth")][-1].split()
    return int(tokens[tokens.index(key) + 1])


def test_clock_is_never_exceeded_over_pipes(pipe):
    """A game of 30 plies against itself over pipes, the clock kept like a server's (the time from
    writing ``go`` to reading ``bestmove``): Black on 1,500 ms + 100 ms/move (Fischer), White on
    0 + 600 ms byoyomi (300 ms searched), the default ByoyomiMargin of 300 ms."""
    pipe.send("usinewgame")
    clock = {"b": 1500.0, "w": 0.0}
    moves: list[str] = []
    board = cshogi.Board()
    used = []
    for ply in range(30):
        side = "b" if ply % 2 == 0 else "w"
        lines, seconds = pipe.ask("position startpos" + (" moves " + " ".join(moves) if moves else ""),
                                  f"go btime {int(clock['b'])} wtime {int(clock['w'])} binc 100 winc 0 byoyomi "
                                  + ("0" if side == "b" else "600"))
        best = lines[-1].split()[1]
        ms = seconds * 1000
        allowed = clock[side] + (600 if side == "w" else 0)
        used.append((side, round(ms), round(allowed)))
        assert ms < allowed, used
        if side == "b":
            clock["b"] += 100 - ms
        if best in ("resign", "win"):
            break
        m = board.move_from_usi(best)
        assert board.is_legal(m)
        board.push(m)
        moves.append(best)
        if board.is_game_over():
            break


#: Issue 18's position: Black's only legal move is 9i8i, after which White mates in one.
FORCED_LOSS_SFEN = "1p6k/9/9/9/9/9/g8/5+r3/K8 b gs 1"
#: Black's only legal move is 9i8h (the king takes the rook), and the game goes on.
ONE_LEGAL_SFEN = "8k/9/9/9/9/9/9/1r7/K8 b - 1"
#: The start position's pieces at move 512 and 511: with MaxMovesToDraw 512, every move of the first
#: ends the game (a draw), and every simulation from the second ends on a draw one move down.
BOARD_AT = "lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - {}"
#: The clocks of issue 18 (ms): byoyomi, a move time, main time with Fischer increments.
CLOCKS = ("go btime 0 wtime 0 byoyomi 300", "go movetime 300", "go btime 2000 wtime 2000 binc 500 winc 500")


def clock_budget_ms(go: str, move_number: int, margin: int = 300) -> float:
    """What the engine may spend on ``go`` (:func:`time_budget_ms` as the engine applies it)."""
    from keisei_stream.play.engine.protocol import parse_go

    return parse_go(go.split()[1:])[0].budget_ms(cshogi.BLACK, move_number, margin)


@pytest.mark.parametrize("go", CLOCKS)
def test_decided_positions_answer_at_once_under_every_clock(pipe, go):
    """Issue 18: the only legal move, and a move limit's last move (every move draws), are answered
    without a search (``nodes 0``: deterministic), so within any clock; before, the first took
    2.1-2.3 s under byoyomi 300 (the search ran to the tree-size bound)."""
    pipe.send("setoption name MaxMovesToDraw value 512", "usinewgame")
    for sfen, best, value in ((FORCED_LOSS_SFEN, "9i8i", -1.0), (BOARD_AT.format(512), None, 0.0)):
        lines, seconds = pipe.ask(f"position sfen {sfen}", go)
        move = lines[-1].split()[1]
        assert move == best if best else legal_after_sfen(sfen, move), lines
        # the exact value: lost (a mate in one follows), or drawn
        assert info_field(lines, "nodes") == 0 and info_field(lines, "cp") == value_to_cp(value), lines
        assert info_field(lines, "time") <= clock_budget_ms(go, int(sfen.split()[-1])), lines
        assert seconds < 10.0  # a hang, not the clock: the pipes of a loaded machine are slow
    # the only legal move, not a decided game: played at once, with no score (it has no value)
    lines, _ = pipe.ask(f"position sfen {ONE_LEGAL_SFEN}", go)
    assert lines[-1] == "bestmove 9i8h" and info_field(lines, "nodes") == 0 and " score " not in lines[-2]


@pytest.mark.parametrize("go", CLOCKS)
def test_a_search_whose_simulations_end_on_the_move_limit_keeps_the_clock(pipe, go):
    """Issue 18: at move 511 of a 512-move game each simulation past the root's children ends on a
    draw, queuing nothing for the network; the search still ends on its budget (the engine's own
    ``time``; ``ByoyomiMargin`` is the slack for the pipes) and far from the tree bound."""
    pipe.send("setoption name MaxMovesToDraw value 512", "usinewgame")
    lines, _ = pipe.ask(f"position sfen {BOARD_AT.format(511)}", go)
    assert legal_after_sfen(BOARD_AT.format(511), lines[-1].split()[1]), lines
    budget = clock_budget_ms(go, 511)
    # the budget plus the margin it keeps: the byoyomi / move time itself (300 ms; the margin is
    # cut to half of it), or the budget + 300 ms under a main time of 2 s
    limit = 300 if "byoyomi" in go or "movetime" in go else budget + 300
    assert 0 < info_field(lines, "nodes") < 1_000_000
    assert info_field(lines, "time") <= limit, (budget, lines)


def legal_after_sfen(sfen: str, move: str) -> bool:
    b = cshogi.Board(sfen)
    return b.is_legal(b.move_from_usi(move))


def test_stop_answers_at_once_when_every_simulation_ends_on_a_terminal(eng):
    """Issue 18: ``go infinite`` then ``stop``: in the forced position the answer is ready at once
    (held until ``stop``); two moves before a move limit every simulation ends on a draw, and
    ``stop`` still ends the search (before: 1.4 s and 20 s after ``stop``, at the tree bound)."""
    e, out = eng
    e.handle(f"position sfen {FORCED_LOSS_SFEN}")
    e.handle("go infinite")
    time.sleep(0.2)
    assert out.count("bestmove") == 0
    n = len(out.lines)
    e.handle("stop")
    i, _, best = out.wait("bestmove", after=n)
    assert best == "bestmove 9i8i" and info_field(out.text()[:i], "nodes") == 0
    e.handle("setoption name MaxMovesToDraw value 2")
    e.handle("usinewgame")
    e.handle("position startpos")
    e.handle("go nodes 200")  # the 30 children are valued; deeper simulations end on draws
    out.wait("bestmove", after=i + 1)
    n = len(out.lines)
    e.handle("go infinite")
    time.sleep(0.3)
    e.handle("stop")  # returns once the search thread has answered
    i, _, best = out.wait("bestmove", after=n)
    assert legal_after([], best.split()[1])
    assert 0 < info_field(out.text()[n:i], "nodes") < 1_000_000
    assert e.mcts.root.n_sum < e.mcts.options.max_tree_visits


def network_value(e: UsiEngine, board: cshogi.Board, ply: int) -> float:
    """The engine's network's value of ``board`` shown at ``ply`` (no repetition)."""
    import torch

    from keisei_stream.shogi import encode_observation

    with torch.inference_mode():
        _, v = e.player.model(torch.from_numpy(encode_observation(board, ply, 0, e.mcts.max_plies))[None])
    return float(v[0])


def test_the_sfen_move_number_sets_the_ply_plane_and_the_move_limit(eng):
    """Issue 18: ``position sfen ... N`` is N - 1 moves into the game: the network sees that ply
    (clamped to the last training ply, 63 for this net's max_plies 64), a game from move 300 goes
    on past the training limit (no draw without MaxMovesToDraw) and the GUI's limit counts from
    the game's start."""
    e, out = eng
    body = BOARD_AT.format(1).rsplit(" ", 1)[0]
    e.handle(f"position sfen {body} 21 moves 7g7f")  # ply 21: below the training limit
    e.handle("go nodes 8")
    out.wait("bestmove")
    board = cshogi.Board(f"{body} 21")
    board.push_usi("7g7f")
    assert e.mcts.root.value == pytest.approx(network_value(e, board, 21), abs=1e-5)
    assert abs(network_value(e, board, 21) - network_value(e, board, 1)) > 1e-4  # the test can tell
    # a game from move 300: four moves, the engine playing both sides, each search's root shown at
    # the clamped ply 63 (not at 0-3, the moves since the SFEN) and no move a draw
    moves: list[str] = []
    for _ in range(4):
        n = len(out.lines)
        e.handle(f"position sfen {body} 300" + (" moves " + " ".join(moves) if moves else ""))
        e.handle("go nodes 16")
        _, _, best = out.wait("bestmove", after=n)
        board = cshogi.Board(f"{body} 300")
        for m in moves:
            board.push_usi(m)
        assert e.mcts.root.value == pytest.approx(network_value(e, board, 63), abs=1e-5)
        assert all(c.reason != int(EndReason.MAX_PLIES) for c in e.mcts.root.children.values())
        moves.append(best.split()[1])
        assert board.is_legal(board.move_from_usi(moves[-1]))
    assert abs(network_value(e, board, 63) - network_value(e, board, 3)) > 1e-4
    # the GUI's limit: 301 moves, so at move 301 every move draws (answered at once, cp 0)
    e.handle("setoption name MaxMovesToDraw value 301")
    n = len(out.lines)
    e.handle(f"position sfen {body} 300 moves {moves[0]}")
    e.handle("go nodes 100")
    i, _, best = out.wait("bestmove", after=n)
    assert info_field(out.text()[n:i], "nodes") == 0 and " score cp 0 " in out.text()[i - 1]


def test_the_training_limit_is_not_a_draw_rule(eng):
    """This net was trained with max_plies 64; a game 70 moves long goes on: its children are
    searched positions, not draws (before, every child was a draw from ply 63 on)."""
    e, out = eng
    board = cshogi.Board()
    moves, _, _ = random_opening(board, 70, np.random.default_rng(0))
    usi = [cshogi.move_to_usi(m) for m in moves]
    e.handle("position startpos moves " + " ".join(usi))
    e.handle("go nodes 64")
    _, _, best = out.wait("bestmove")
    assert legal_after(usi, best.split()[1])
    assert e.mcts.root.n_sum == 64 and not any(c.terminal is not None and c.reason == int(EndReason.MAX_PLIES)
                                               for c in e.mcts.root.children.values())
    # the raw policy sees the same clamped ply: its score is the network's value at ply 63
    e.handle("setoption name Nodes value 0")
    n = len(out.lines)
    e.handle("go")
    i, _, _ = out.wait("bestmove", after=n)
    assert info_field(out.text()[n:i], "cp") == value_to_cp(network_value(e, board, 63))


def test_complete_games_under_cshogi_cli(ckpt, tmp_path):
    """cshogi's match runner (cshogi.usi.Engine) plays 2 complete games: keisei with search against
    keisei without (Nodes 0, Temperature 1), 200 ms byoyomi and a main time it checks (a move more
    than 1 s over the remaining time loses), a draw at move 60; no time loss, no illegal move; CSA
    records written and parsed back.

    Not with ``--ponder``: cshogi.cli sends ``go ponder`` from an executor thread and may send the
    ``stop`` of a missed ponder before that ``go ponder`` (seen here against an opponent that
    answers in 1 ms), after which it waits forever for the ponder's answer. Pondering is tested
    above, in-process, with the exact ordering."""
    script = tmp_path / "keisei_engine.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m keisei_stream.cli usi --checkpoint {ckpt} \"$@\"\n")
    script.chmod(0o755)
    csa_dir = tmp_path / "csa"
    csa_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "cshogi.cli", str(script), str(script), "--games", "2",
                        "--byoyomi", "200", "--time", "1000", "--draw", "60", "--keep-process",
                        "--options1", "BatchSize:4,ByoyomiMargin:100",
                        "--options2", "Nodes:0,Temperature:1.0", "--csa", str(csa_dir)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 of 2 games finished." in p.stdout
    assert "切れ負け" not in p.stdout  # time loss
    files = sorted(csa_dir.glob("*.csa"))
    assert files
    from cshogi import CSA

    for f in files:
        text = f.read_text()
        assert "%TIME_UP" not in text and "%ILLEGAL_MOVE" not in text
        for game in CSA.Parser.parse_file(str(f)):
            b = cshogi.Board()
            for m in game.moves:
                assert b.is_legal(m)
                b.push(m)
            assert len(game.moves) >= 1


def test_engine_under_the_referee(ckpt):
    spec = (f"usi:{sys.executable} -m keisei_stream.cli usi --checkpoint {ckpt} --batch-size 4;"
            "go=go byoyomi 300;option.ByoyomiMargin=100")
    res = play_match(spec, "random", games=2, max_plies=40, progress=False)
    assert res.games == 2
    assert "illegal" not in res.reasons and "crash" not in res.reasons and "timeout" not in res.reasons
    assert res.name_a.startswith("keisei-stream")
