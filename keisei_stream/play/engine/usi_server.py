"""The trained network as a USI engine on stdin/stdout (``keisei usi --checkpoint FILE``), with the
PUCT tree search of :mod:`keisei_stream.play.engine.mcts` (or one forward pass per move, ``Nodes 0``).

Protocol: USI (http://shogidokoro.starfree.jp/usi.html, the USI 2.0 description). Handled:

- ``usi`` -> ``id name``, ``id author``, one ``option`` line per entry of
  :data:`keisei_stream.play.engine.usi_options.OPTIONS`,
  ``usiok`` (answered before torch is imported, so GUIs register the engine quickly);
- ``setoption name N [value V]``: every value is checked at once (type, range, an existing
  device); a bad value or an unknown name is answered with ``info string ...`` and ignored, the
  option keeping its value. Values take effect at the next ``isready`` / ``go``;
- ``isready`` -> loads the model (once; again after a ``Device`` change) and warms it up ->
  ``readyok``; during a search, ``readyok`` at once;
- ``usinewgame`` (drops the tree, re-seeds), ``gameover ...`` (ends a ponder search, which
  answers: cshogi's client waits for that ``bestmove``), ``quit`` (stops a search, which answers);
- ``position startpos|sfen <sfen> [moves m1 m2 ...]``: replayed with cshogi (an illegal move
  stops the replay and is reported as ``info string``). The SFEN's move number N says that N - 1
  moves came before it: the position's ply (moves since the game's start) is N - 1 plus the moves
  listed, for the network's ply plane (clamped as in training,
  :func:`keisei_stream.play.engine.leaves.training_ply`), the move limit and the time budget;
- ``go``: the search runs in a worker thread; the main thread keeps reading commands. A command
  that needs the engine idle (``go``, ``usinewgame``, ``gameover``, end of input) waits for a
  search with limits to end and answer, so commands piped in at once are all answered; a ``go``
  during a ponder/infinite search (the GUI forgot ``stop``) ends it without an answer (its move
  would read as the answer to the new ``go``).

  * ``go nodes N``: N simulations; ``go`` alone or ``go depth D``: ``Nodes`` simulations;
  * ``go btime B wtime W [binc I winc J] [byoyomi Y]`` and ``go movetime T``: a time budget
    (:func:`keisei_stream.play.engine.protocol.time_budget_ms`) that keeps ``ByoyomiMargin`` ms
    of the time that may be spent;
  * ``go infinite``: until ``stop``; ``go ponder ...``: until ``stop`` (answered with the
    search's move, which the GUI ignores) or ``ponderhit``, from which moment the time budget
    of the ``go ponder`` arguments counts (the simulations made while pondering count towards a
    node limit); no ``bestmove`` before either, as the protocol requires, even when the search
    ends on its own (tree size limit, a mate found, no legal move);
  * ``stop``: the search ends before its next simulation (after the forward pass of the leaves
    already queued), and ``bestmove`` follows at once;
  * ``go mate ...`` -> ``checkmate notimplemented``.

  Answers: ``info depth D seldepth S nodes N nps X time MS score cp C|mate M pv ...`` every
  ``InfoInterval`` ms and once at the end, then ``bestmove MOVE [ponder REPLY]``;
  ``bestmove win`` when the side to move can declare entering king, ``bestmove resign`` without
  a legal move (both judged by the referee, :func:`keisei_stream.play.engine.shortcuts.root_shortcut`).
  ``nodes`` counts the simulations of this ``go`` (a reused tree's earlier visits are not
  counted); ``depth`` is the length of the principal variation (most visited child at each
  level), ``seldepth`` the deepest simulation.

The tree is kept between moves: a ``position`` that extends the last searched position (our move,
the opponent's reply; or the ponder move) continues from the subtree already searched.

The rules of the game searched are the referee's (:func:`keisei_stream.shogi.judge`) with the
game's own move limit, the option ``MaxMovesToDraw`` (0, the default: none), never the
``env.max_plies`` the network was trained with. The only legal move, or a position where every
move ends the game (the best exact value), is answered at once without a search
(:mod:`keisei_stream.play.engine.shortcuts`); a search checks ``stop``,
``ponderhit``'s new deadline and its time budget before every simulation.

Scores: ``score cp`` is the best move's mean value ``q`` in [-1, 1] (the network's root value
before any simulation, the exact value of a move played without a search; none for the only legal
move) mapped through ``p = (q + 1) / 2``, ``cp = 600 * ln(p / (1 - p))`` (the
usual 600-centipawn logistic scale of shogi engines), clamped to +-30000; ``score mate N`` when
the root mate search (cshogi's ``mate_move``, up to ``MateSearchPlies``) proved a mate in N
plies, or the chosen move mates at once.

Errors: a line that fails is answered with ``info string error: ...`` (and for ``go``, the raw
policy's move, else ``bestmove resign``); an engine whose checkpoint cannot be loaded at
``isready`` says so in ``info string`` and stops (exit code 1).

Use with a GUI (ShogiGUI, Shogidokoro, ShogiHome): register a small script as the engine, e.g.
``#!/bin/sh`` / ``exec /path/to/python -m keisei_stream.cli usi --checkpoint /path/ckpt.pt``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import IO, Any, Optional

import cshogi

from keisei_stream.play.engine.protocol import GoParams, info_line, parse_go, parse_position, value_to_cp
from keisei_stream.play.engine.shortcuts import root_shortcut
from keisei_stream.play.engine.tree import SearchLimits, position_counts
from keisei_stream.play.engine.usi_job import SearchJob
from keisei_stream.play.engine.usi_options import DEFAULT_BATCH_SIZE, DEFAULT_NODES, OPTIONS, set_option
from keisei_stream.shogi import EndReason, repetition_feature

ENGINE_NAME = "keisei-stream"
AUTHOR = "keisei-stream contributors"


class EngineError(Exception):
    """The engine cannot go on (its checkpoint cannot be loaded)."""


class UsiEngine:
    """The engine's state machine; :meth:`handle` takes one input line and writes answers to ``out``.

    Args:
        checkpoint: path of the checkpoint (loaded at ``isready`` or the first ``go``).
        out: text stream for answers (flushed after each line; written by the search thread too,
            one whole line at a time).
        temperature, device, seed, threads, nodes, batch_size: initial values of the options
            ``Temperature``, ``Device``, ``Seed``, ``Threads``, ``Nodes``, ``BatchSize``.
        name: the ``id name`` (default ``keisei-stream <checkpoint stem>``).
        log: text stream that receives the dialogue (``< `` input, ``> `` output lines), or None.
    """

    def __init__(self, checkpoint: str, out: IO[str], temperature: float = 0.0, device: str = "cpu",
                 seed: int = 0, name: Optional[str] = None, log: Optional[IO[str]] = None, threads: int = 1,
                 nodes: int = DEFAULT_NODES, batch_size: int = DEFAULT_BATCH_SIZE):
        self.checkpoint = checkpoint
        self.out = out
        self.log = log
        self.values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
        self.values.update(Temperature=float(temperature), Device=device, Seed=int(seed), Threads=int(threads),
                           Nodes=int(nodes), BatchSize=int(batch_size))
        self.name = name or f"{ENGINE_NAME} {Path(checkpoint).stem}"
        self.player = None   # ModelPlayer: the raw policy (Nodes 0, and the fallback)
        self.mcts = None     # MCTS over the same model
        self._loaded: dict[str, Any] = {}
        self.board = cshogi.Board()
        self.repetition = 0
        self._out_lock = threading.Lock()
        self._job: Optional[SearchJob] = None   # the last go's (its answer's states: usi_job.py)

    # -- output
    def send(self, line: str) -> None:
        """Write one answer line to ``out`` (and ``log``), flushed; safe from any thread. Line
        breaks inside (a multi-line error message) become spaces: one answer, one line."""
        if "\n" in line or "\r" in line:
            line = " ".join(part.strip() for part in line.splitlines() if part.strip())
        with self._out_lock:
            self.out.write(line + "\n")
            self.out.flush()
            if self.log is not None:
                self.log.write(f"> {line}\n")
                self.log.flush()

    # -- model
    def _ensure_loaded(self) -> None:
        """Load the model (first time, or a changed ``Device``), build the search (again after a
        ``BatchSize`` change) and apply the other options. Called only while no search runs."""
        import torch

        from keisei_stream.play.engine.mcts import MCTS
        from keisei_stream.play.engine.model_player import ModelPlayer, load_player_model
        from keisei_stream.play.players import SpecError

        v = self.values
        if self._loaded.get("Threads") != v["Threads"]:
            torch.set_num_threads(v["Threads"])
            self._loaded["Threads"] = v["Threads"]
        if self.player is None or self._loaded.get("Device") != v["Device"]:
            try:
                model, cfg, meta, _ = load_player_model(self.checkpoint, v["Device"])
            except SpecError as exc:
                raise EngineError(str(exc)) from None
            except Exception as exc:  # e.g. torch's own errors for a device it cannot use
                raise EngineError(f"{type(exc).__name__}: {exc}") from None
            self.player = ModelPlayer((model, cfg, meta), seed=v["Seed"], threads=None)
            self.mcts = None
            self._loaded["Device"] = v["Device"]
        if self.mcts is None or self._loaded.get("BatchSize") != v["BatchSize"]:
            self.mcts = MCTS(self.player.model, max_plies=int(self.player.config.env.max_plies),
                             draw_plies=v["MaxMovesToDraw"], batch_size=v["BatchSize"], seed=v["Seed"])
            self._loaded["BatchSize"] = v["BatchSize"]
            self._warm_up()
        self.player.temperature = v["Temperature"]
        self.mcts.draw_plies = v["MaxMovesToDraw"]
        self.mcts.options.temperature = v["Temperature"]
        self.mcts.options.mate_search_plies = v["MateSearchPlies"]

    def _warm_up(self) -> None:
        """One small search from the start position (first forward passes are slow: lazy
        allocations, kernel selection), then a fresh tree."""
        self.mcts.search(cshogi.Board(), nodes=min(2 * self.mcts.batch_size, 64))
        self.mcts.reset()

    def _reseed(self) -> None:
        import numpy as np

        if self.player is not None:
            self.player.generator.manual_seed(self.values["Seed"])
        if self.mcts is not None:
            self.mcts.rng = np.random.default_rng(self.values["Seed"])

    # -- commands
    def handle(self, line: str) -> bool:
        """Process one input line; returns False on ``quit``.

        Raises:
            EngineError: the checkpoint cannot be loaded (at ``isready`` or ``go``).
        """
        t_received = time.perf_counter()
        if self.log is not None:
            self.log.write(f"< {line.rstrip()}\n")
            self.log.flush()
        tokens = line.strip().split()
        if not tokens:
            return True
        cmd, args = tokens[0], tokens[1:]
        try:
            if cmd == "usi":
                self.send(f"id name {self.name}")
                self.send(f"id author {AUTHOR}")
                for o in OPTIONS:
                    self.send(o.line(self.values[o.name]))
                self.send("usiok")
            elif cmd == "isready":
                if not self._searching():
                    self._ensure_loaded()
                self.send("readyok")
            elif cmd == "setoption":
                problem = set_option(self.values, args)
                if problem:
                    self.send(f"info string {problem}")
            elif cmd == "usinewgame":
                self._end_job("finish")
                if self.mcts is not None:
                    self.mcts.reset()
                self._reseed()
            elif cmd == "position":
                self.board, _start, _moves, err = parse_position(args)
                self.repetition = self._repetition()
                if err:
                    self.send(f"info string {err}")
            elif cmd == "go":
                self._go(args, t_received)
            elif cmd == "stop":
                self._end_job("stop")
            elif cmd == "ponderhit":
                self._ponderhit(t_received)
            elif cmd == "quit":
                self._end_job("stop")
                return False
            elif cmd == "gameover":
                self._end_job("finish")
            # anything else (debug, register, unknown): ignored, as the protocol suggests
        except EngineError:
            raise
        except Exception as exc:  # never die on one bad line; a GUI shows info strings
            self.send(f"info string error: {type(exc).__name__}: {exc}")
            if cmd == "go" and not self._searching():
                self.send("bestmove resign")
        return True

    def close(self) -> None:
        """End of input: a search with limits runs to its end and answers; ponder/infinite stop."""
        self._end_job("finish")

    def _repetition(self) -> int:
        """Earlier occurrences (0..2) of the current position in the game given by ``position``
        (counted over the board's own history, which ``parse_position`` has just played)."""
        return repetition_feature(position_counts(self.board)[self.board.zobrist_hash()])

    # -- search jobs (the answer's states: keisei_stream.play.engine.usi_job)
    def _searching(self) -> bool:
        return self._job is not None and self._job.running()

    def _limits(self, params: GoParams, board: cshogi.Board, t_start: float) -> SearchLimits:
        """The limits of a ``go`` on ``board`` with its clock starting at ``t_start``."""
        return params.search_limits(board.turn, board.move_number, t_start, self.values["ByoyomiMargin"],
                                    self.values["Nodes"])

    def _go(self, args: list[str], t_received: float) -> None:
        if args and args[0] == "mate":
            self.send("checkmate notimplemented")
            return
        self._end_job("replace")
        params, problems = parse_go(args)
        for p in problems:
            self.send(f"info string {p}")
        self._ensure_loaded()
        # plies since the game's real start: the SFEN's move number counts the moves before it
        job = SearchJob(self.board.copy(), max(0, self.board.move_number - 1), self.repetition, params, t_received,
                        raw=self.values["Nodes"] == 0, send=self.send)
        if not job.hold:
            job.limits = self._limits(params, job.board, t_received)
        self._job = job
        job.start(self._think)

    def _ponderhit(self, t_received: float) -> None:
        job = self._job
        if job is not None:
            job.ponderhit(self._limits(job.params, job.board, t_received))

    def _end_job(self, how: str) -> None:
        """End the current search, if any (:meth:`SearchJob.end`: ``"stop"``, ``"finish"`` or
        ``"replace"``), and wait for its thread."""
        job = self._job
        if job is not None:
            job.end(how)
            self._job = None

    def _think(self, job: SearchJob) -> str:
        """The search thread: search (or one forward pass), info lines; returns the ``bestmove``
        line, never raises."""
        try:
            return self._raw_answer(job) if job.raw else self._search_answer(job)
        except Exception as exc:  # a failed forward pass: say so, fall back to the raw policy
            if not job.discard:
                self.send(f"info string error: {type(exc).__name__}: {exc}")
            try:
                return self._raw_answer(job)
            except Exception:
                return "bestmove resign"

    def _raw_answer(self, job: SearchJob) -> str:
        board = job.board
        shortcut = root_shortcut(board, len(board.legal_moves))
        if shortcut is not None:
            return f"bestmove {shortcut}"
        move, value = self.player.policy_move(board, job.ply, job.repetition)
        best = cshogi.move_to_usi(move)
        ms = _ms_since(job.t0)
        if not job.discard:
            self.send(f"info depth 1 seldepth 1 nodes 1 time {ms} score cp {value_to_cp(value)} pv {best}")
        return f"bestmove {best}"

    def _search_answer(self, job: SearchJob) -> str:
        interval = self.values["InfoInterval"]

        def on_info(res) -> None:
            if not job.discard and res.pv:
                self.send(info_line(res, _ms_since(job.t0)))

        res = self.mcts.search(job.board, ply=job.ply, limits=job.limits, stop_event=job.stop,
                               info=on_info if interval > 0 else None, info_interval=interval / 1000.0)
        if res.best_move == 0:  # "win" or "resign": no move to show
            return f"bestmove {res.best_usi}"
        if res.mate_in is None and self._mates_at_once(res.best_move):
            res.mate_in = 1
        if not job.discard:
            self.send(info_line(res, _ms_since(job.t0)))
        ponder = res.ponder_usi
        return f"bestmove {res.best_usi}" + (f" ponder {ponder}" if ponder else "")

    def _mates_at_once(self, move: int) -> bool:
        root = self.mcts.root
        if root is None:
            return False
        child = root.children.get(root.child_index(move))
        return child is not None and child.terminal == -1.0 and child.reason == int(EndReason.CHECKMATE)


def _ms_since(t0: float) -> int:
    """Whole milliseconds since ``t0`` (``time.perf_counter()``)."""
    return int((time.perf_counter() - t0) * 1000)


def run_engine(inp: IO[str], out: IO[str], checkpoint: str, *, temperature: float = 0.0, device: str = "cpu",
               seed: int = 0, name: Optional[str] = None, log: Optional[IO[str]] = None, threads: int = 1,
               nodes: int = DEFAULT_NODES, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Serve the USI protocol on ``inp``/``out`` (text streams) until ``quit`` or end of input.

    Arguments as :class:`UsiEngine`.

    Returns:
        0, or 1 when the checkpoint cannot be loaded (said in ``info string`` first).
    """
    engine = UsiEngine(checkpoint, out, temperature, device, seed, name, log, threads, nodes, batch_size)
    try:
        while True:
            line = inp.readline()
            if not line:
                return 0
            if not engine.handle(line):
                return 0
    except EngineError as exc:
        engine.send(f"info string error: cannot load {checkpoint}: {exc}")
        return 1
    finally:
        engine.close()
