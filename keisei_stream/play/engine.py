"""The trained network as a USI engine on stdin/stdout (``keisei usi --checkpoint FILE``), with the
PUCT tree search of :mod:`keisei_stream.play.search` (or one forward pass per move, ``Nodes 0``).

Protocol: USI (http://shogidokoro.starfree.jp/usi.html, the USI 2.0 description). Handled:

- ``usi`` -> ``id name``, ``id author``, one ``option`` line per entry of :data:`OPTIONS`,
  ``usiok`` (answered before torch is imported, so GUIs register the engine quickly);
- ``setoption name N [value V]``: every value is checked at once (type, range, an existing
  device); a bad value or an unknown name is answered with ``info string ...`` and ignored, the
  option keeping its value. Values take effect at the next ``isready`` / ``go``;
- ``isready`` -> loads the model (once; again after a ``Device`` change) and warms it up ->
  ``readyok``; during a search, ``readyok`` at once;
- ``usinewgame`` (drops the tree, re-seeds), ``gameover ...`` (ends a ponder search, which
  answers: cshogi's client waits for that ``bestmove``), ``quit`` (stops a search, which answers);
- ``position startpos|sfen <sfen> [moves m1 m2 ...]``: replayed with cshogi (an illegal move
  stops the replay and is reported as ``info string``);
- ``go``: the search runs in a worker thread; the main thread keeps reading commands. A command
  that needs the engine idle (``go``, ``usinewgame``, ``gameover``, end of input) waits for a
  search with limits to end and answer, so commands piped in at once are all answered; a ``go``
  during a ponder/infinite search (the GUI forgot ``stop``) ends it without an answer (its move
  would read as the answer to the new ``go``).

  * ``go nodes N``: N simulations; ``go`` alone or ``go depth D``: ``Nodes`` simulations;
  * ``go btime B wtime W [binc I winc J] [byoyomi Y]`` and ``go movetime T``: a time budget
    (:func:`time_budget_ms`) that keeps ``ByoyomiMargin`` ms of the time that may be spent;
  * ``go infinite``: until ``stop``; ``go ponder ...``: until ``stop`` (answered with the
    search's move, which the GUI ignores) or ``ponderhit``, from which moment the time budget
    of the ``go ponder`` arguments counts (the simulations made while pondering count towards a
    node limit); no ``bestmove`` before either, as the protocol requires, even when the search
    ends on its own (tree size limit, a mate found, no legal move);
  * ``stop``: the search ends after the batch in flight, and ``bestmove`` follows at once;
  * ``go mate ...`` -> ``checkmate notimplemented``.

  Answers: ``info depth D seldepth S nodes N nps X time MS score cp C|mate M pv ...`` every
  ``InfoInterval`` ms and once at the end, then ``bestmove MOVE [ponder REPLY]``;
  ``bestmove win`` when the side to move can declare entering king (``board.is_nyugyoku()``),
  ``bestmove resign`` without a legal move. ``nodes`` counts the simulations of this ``go``
  (a reused tree's earlier visits are not counted); ``depth`` is the length of the principal
  variation (most visited child at each level), ``seldepth`` the deepest simulation.

The tree is kept between moves: a ``position`` that extends the last searched position (our move,
the opponent's reply; or the ponder move) continues from the subtree already searched.

Scores: ``score cp`` is the best move's mean value ``q`` in [-1, 1] (the network's root value
before any simulation) mapped through ``p = (q + 1) / 2``, ``cp = 600 * ln(p / (1 - p))`` (the
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

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional

import cshogi

from keisei_stream.shogi import RepetitionTracker, repetition_feature, validate_sfen

ENGINE_NAME = "keisei-stream"
AUTHOR = "keisei-stream contributors"
#: simulations per move when ``go`` gives no limit (the issue's 800 nodes/move)
DEFAULT_NODES = 800
DEFAULT_BATCH_SIZE = 16
DEFAULT_BYOYOMI_MARGIN_MS = 300
DEFAULT_MATE_SEARCH_PLIES = 5
DEFAULT_INFO_INTERVAL_MS = 1000


class EngineError(Exception):
    """The engine cannot go on (its checkpoint cannot be loaded)."""


def value_to_cp(v: float) -> int:
    """Value in [-1, 1] -> centipawns on the 600 logistic scale (clamped to +-30000)."""
    if not math.isfinite(v):
        return 0
    p = min(max((v + 1.0) / 2.0, 1e-9), 1.0 - 1e-9)
    return int(max(-30000, min(30000, round(600.0 * math.log(p / (1.0 - p))))))


def parse_position(tokens: list[str]) -> tuple[cshogi.Board, str, list[str], Optional[str]]:
    """``position`` arguments -> ``(board, start_sfen or "startpos", moves played, error or None)``.

    The board ends after the last legal move of the list; an illegal or malformed move stops the
    replay (its text is in the error). A malformed command or SFEN gives the start position and
    the error text; nothing is raised.
    """
    error = None
    if not tokens:
        return cshogi.Board(), "startpos", [], "empty position command"
    if "moves" in tokens:
        i = tokens.index("moves")
        head, moves = tokens[:i], tokens[i + 1:]
    else:
        head, moves = tokens, []
    if not head:
        return cshogi.Board(), "startpos", [], f"bad position command {' '.join(tokens)!r}"
    if head[0] == "startpos":
        board, start = cshogi.Board(), "startpos"
    elif head[0] == "sfen" and len(head) >= 4:
        try:
            start = validate_sfen(" ".join(head[1:5]))
        except ValueError as exc:
            return cshogi.Board(), "startpos", [], str(exc)
        board = cshogi.Board()
        board.set_sfen(start)
        if not board.is_ok():
            return cshogi.Board(), "startpos", [], f"bad sfen {start!r}"
    else:
        return cshogi.Board(), "startpos", [], f"bad position command {' '.join(tokens)!r}"
    played = []
    for mv in moves:
        try:
            m = board.move_from_usi(mv)
        except Exception:
            m = 0
        if not m or not board.is_legal(m):
            error = f"illegal move {mv!r} after {len(played)} moves; position kept before it"
            break
        board.push(m)
        played.append(mv)
    return board, start, played, error


# ------------------------------------------------------------------------------------------------
# time management


def time_budget_ms(remaining: float, increment: float, byoyomi: float, move_number: int, margin: float) -> float:
    """Milliseconds to search for a move under a ``go btime/wtime/binc/winc/byoyomi`` clock.

    python-dlshogi2's rule (``mcts_player.py``, ``set_limits``): ``remaining / (14 + max(0, 30 -
    move_number)) + increment``, at least the byoyomi, then never more than what can be spent
    without losing: ``remaining + byoyomi - margin`` (the increment is only credited after the
    move). The margin (``ByoyomiMargin``) covers the time between our ``bestmove`` and the
    GUI's clock (pipes, the process being descheduled); when it is more than half of the time
    that may be spent it is cut to half (a 100 ms byoyomi leaves 50 ms to search, not none).

    Args:
        remaining: the side to move's remaining main time (ms, >= 0).
        increment: its increment per move (ms, >= 0; Fischer).
        byoyomi: byoyomi (ms, >= 0).
        move_number: the move being played (1 = the game's first).
        margin: ms kept back (>= 0).

    Returns:
        the budget in ms (>= 0; 0 means: play the network's move without search).
    """
    remaining, increment, byoyomi = max(0.0, remaining), max(0.0, increment), max(0.0, byoyomi)
    available = remaining + byoyomi
    keep = min(max(0.0, margin), available / 2.0)
    hard = available - keep
    target = remaining / (14 + max(0, 30 - int(move_number))) + increment
    if byoyomi > 0:
        target = max(target, byoyomi - keep)
    return max(0.0, min(target, hard))


@dataclass
class GoParams:
    """A parsed ``go`` command (times in ms; None = not given)."""

    ponder: bool = False
    infinite: bool = False
    btime: Optional[int] = None
    wtime: Optional[int] = None
    binc: Optional[int] = None
    winc: Optional[int] = None
    byoyomi: Optional[int] = None
    movetime: Optional[int] = None
    nodes: Optional[int] = None
    depth: Optional[int] = None

    def timed(self) -> bool:
        """A clock or a move time was given."""
        return any(x is not None for x in (self.btime, self.wtime, self.binc, self.winc, self.byoyomi, self.movetime))


_GO_INT = ("btime", "wtime", "binc", "winc", "byoyomi", "movetime", "nodes", "depth")


def parse_go(args: list[str]) -> tuple[GoParams, list[str]]:
    """``go`` arguments -> ``(GoParams, problems)``; a malformed or negative number is left out
    and described in ``problems`` (the engine says so in ``info string``)."""
    g = GoParams()
    problems = []
    i = 0
    while i < len(args):
        t = args[i]
        if t in ("ponder", "infinite"):
            setattr(g, t, True)
            i += 1
        elif t in _GO_INT:
            v = args[i + 1] if i + 1 < len(args) else None
            try:
                n = int(v)  # type: ignore[arg-type]
                if n < 0:
                    raise ValueError
                setattr(g, t, n)
            except (TypeError, ValueError):
                problems.append(f"go: bad {t} value {v!r}, ignored")
            i += 2
        else:
            problems.append(f"go: unknown argument {t!r}, ignored")
            i += 1
    return g, problems


# ------------------------------------------------------------------------------------------------
# options


def _check_device(text: str) -> str:
    import torch

    from keisei_stream.rl.model import pick_device

    dev = pick_device(text)  # ValueError for unknown names and CUDA without CUDA
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"no device {text} ({torch.cuda.device_count()} CUDA device(s))")
    return text


def _check_temperature(text: str) -> float:
    t = float(text)
    if not math.isfinite(t) or t < 0 or t > 100:
        raise ValueError("must be a number in [0, 100]")
    return t


@dataclass
class UsiOption:
    """One USI option: ``kind`` is ``spin``, ``check`` or ``string``; ``parse`` turns a valid
    ``setoption`` value into the engine's value and raises ValueError (with the reason) otherwise."""

    name: str
    kind: str
    default: Any
    lo: Optional[int] = None
    hi: Optional[int] = None
    check: Optional[Callable[[str], Any]] = None
    doc: str = ""

    def line(self, value: Any) -> str:
        """The ``option name ... type ... default ...`` line, with ``value`` as the default."""
        if self.kind == "spin":
            return f"option name {self.name} type spin default {value} min {self.lo} max {self.hi}"
        if self.kind == "check":
            return f"option name {self.name} type check default {'true' if value else 'false'}"
        return f"option name {self.name} type string default {value}"

    def parse(self, text: str) -> Any:
        text = text.strip()
        if self.kind == "spin":
            try:
                v = int(text)
            except ValueError:
                raise ValueError("not an integer") from None
            if not self.lo <= v <= self.hi:
                raise ValueError(f"out of range [{self.lo}, {self.hi}]")
            return v
        if self.kind == "check":
            if text.lower() not in ("true", "false"):
                raise ValueError("must be true or false")
            return text.lower() == "true"
        if not text:
            raise ValueError("empty")
        return self.check(text) if self.check else text


#: The engine's options (name, type, default, range); ``keisei usi`` arguments change some defaults.
OPTIONS: list[UsiOption] = [
    UsiOption("Nodes", "spin", DEFAULT_NODES, 0, 100_000_000,
              doc="simulations per move when go gives no limit; 0 = no search: one forward pass per move"),
    UsiOption("BatchSize", "spin", DEFAULT_BATCH_SIZE, 1, 1024, doc="leaves per forward pass"),
    UsiOption("Threads", "spin", 1, 1, max(256, os.cpu_count() or 1), doc="torch intra-op threads"),
    UsiOption("Device", "string", "cpu", check=_check_device, doc="cpu | cuda | cuda:N | auto"),
    UsiOption("USI_Ponder", "check", False, doc="the GUI may send go ponder (always accepted)"),
    UsiOption("USI_Hash", "spin", 16, 1, 1_048_576, doc="accepted, no effect (the tree is bounded by visits)"),
    UsiOption("ByoyomiMargin", "spin", DEFAULT_BYOYOMI_MARGIN_MS, 0, 60_000,
              doc="ms kept back from the time that may be spent on a move"),
    UsiOption("MateSearchPlies", "spin", DEFAULT_MATE_SEARCH_PLIES, 0, 9,
              doc="root mate search depth (0 off, 1 mate in one, 3/5/7/9 cshogi's mate_move)"),
    UsiOption("InfoInterval", "spin", DEFAULT_INFO_INTERVAL_MS, 0, 3_600_000,
              doc="ms between info lines during a search (0: only the final one)"),
    UsiOption("Temperature", "string", "0", check=_check_temperature,
              doc="0 = best move; > 0 samples (raw policy: softmax(logits/T); search: visits^(1/T))"),
    UsiOption("Seed", "spin", 0, 0, 2_147_483_647, doc="seed of the sampling"),
]
_OPTION_BY_NAME = {o.name.lower(): o for o in OPTIONS}


# ------------------------------------------------------------------------------------------------
# the engine


class _Job:
    """One ``go``: its thread, stop flag, limits, and the answer held during ponder/infinite."""

    def __init__(self, board: cshogi.Board, ply: int, repetition: int, params: GoParams, t0: float, raw: bool):
        from keisei_stream.play.search import SearchLimits

        self.board = board
        self.ply = ply
        self.repetition = repetition
        self.params = params
        self.t0 = t0
        self.raw = raw
        self.hold = params.ponder or params.infinite  # no bestmove before stop / ponderhit
        self.discard = False                            # gameover/quit/a new go: never answer
        self.answer: Optional[str] = None               # the bestmove line, ready while held
        self.stop = threading.Event()
        self.limits = SearchLimits()
        self.thread: Optional[threading.Thread] = None


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
        self.start = "startpos"
        self.moves: list[str] = []
        self.repetition = 0
        self._out_lock = threading.Lock()
        self._lock = threading.Lock()     # the job's hold/answer state
        self._job: Optional[_Job] = None

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

        from keisei_stream.play.loaders import load_player_model
        from keisei_stream.play.model_player import ModelPlayer
        from keisei_stream.play.players import SpecError
        from keisei_stream.play.search import MCTS

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
                             batch_size=v["BatchSize"], seed=v["Seed"])
            self._loaded["BatchSize"] = v["BatchSize"]
            self._warm_up()
        self.player.temperature = v["Temperature"]
        self.mcts.temperature = v["Temperature"]
        self.mcts.mate_search_plies = v["MateSearchPlies"]

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
                self._setoption(args)
            elif cmd == "usinewgame":
                self._end_job("finish")
                if self.mcts is not None:
                    self.mcts.reset()
                self._reseed()
            elif cmd == "position":
                self.board, self.start, self.moves, err = parse_position(args)
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

    def _setoption(self, args: list[str]) -> None:
        if "name" not in args:
            self.send("info string setoption: expected 'setoption name NAME value VALUE'")
            return
        i = args.index("name")
        if "value" in args[i + 1:]:
            j = args.index("value", i + 1)
            name, value = " ".join(args[i + 1:j]), " ".join(args[j + 1:])
        else:
            name, value = " ".join(args[i + 1:]), ""
        opt = _OPTION_BY_NAME.get(name.lower())
        if opt is None:
            self.send(f"info string unknown option {name!r}, ignored")
            return
        try:
            parsed = opt.parse(value)
        except Exception as exc:  # ValueError from the checks; anything else is still a bad value
            self.send(f"info string bad value {value!r} for option {opt.name}: {exc}; "
                      f"keeping {self._show(opt, self.values[opt.name])}")
            return
        self.values[opt.name] = parsed

    @staticmethod
    def _show(opt: UsiOption, value: Any) -> str:
        if opt.kind == "check":
            return "true" if value else "false"
        return str(value)

    def _repetition(self) -> int:
        """Earlier occurrences (0..2) of the current position in the game given by ``position``."""
        b = cshogi.Board() if self.start == "startpos" else cshogi.Board(self.start)
        tracker = RepetitionTracker()
        for mv in self.moves:
            tracker.push(b)
            b.push_usi(mv)
        return repetition_feature(tracker.count(self.board) + 1)

    # -- search jobs
    def _searching(self) -> bool:
        job = self._job
        return job is not None and job.thread is not None and job.thread.is_alive()

    def _limits(self, params: GoParams, t_start: float, board: cshogi.Board, limits) -> None:
        """Set ``limits`` (a SearchLimits) for ``params`` with the clock starting at ``t_start``."""
        nodes = params.nodes
        budget = None
        if params.movetime is not None:
            budget = time_budget_ms(0, 0, params.movetime, 1 << 20, self.values["ByoyomiMargin"])
        elif params.timed():
            black = board.turn == cshogi.BLACK
            remaining = (params.btime if black else params.wtime) or 0
            inc = (params.binc if black else params.winc) or 0
            budget = time_budget_ms(remaining, inc, params.byoyomi or 0, board.move_number,
                                    self.values["ByoyomiMargin"])
        if nodes is None and budget is None:
            nodes = self.values["Nodes"]
        limits.nodes = nodes
        limits.deadline = None if budget is None else t_start + budget / 1000.0

    def _go(self, args: list[str], t_received: float) -> None:
        if args and args[0] == "mate":
            self.send("checkmate notimplemented")
            return
        self._end_job("replace")
        params, problems = parse_go(args)
        for p in problems:
            self.send(f"info string {p}")
        self._ensure_loaded()
        job = _Job(self.board.copy(), len(self.moves), self.repetition, params, t_received,
                   raw=self.values["Nodes"] == 0)
        if not job.hold:
            self._limits(params, t_received, job.board, job.limits)
        job.thread = threading.Thread(target=self._run, args=(job,), name="keisei-search", daemon=True)
        self._job = job
        job.thread.start()

    def _ponderhit(self, t_received: float) -> None:
        job = self._job
        if job is None or not job.params.ponder:
            return
        with self._lock:
            if not job.hold or job.discard:
                return
            job.hold = False
            if job.answer is not None:  # the search had already ended
                self.send(job.answer)
                job.answer = None
                return
            self._limits(job.params, t_received, job.board, job.limits)

    def _end_job(self, how: str) -> None:
        """End the current search (if any) and wait for its thread.

        ``how``:

        - ``"stop"`` (stop, quit): it stops after the batch in flight and its ``bestmove`` is sent;
        - ``"finish"`` (gameover, usinewgame, end of input): a search with limits runs to its
          limits and answers (commands piped in at once); a ponder/infinite search stops and
          answers (cshogi's client, like YaneuraOu, expects a ``bestmove`` after a ``gameover``
          during ponder);
        - ``"replace"`` (a ``go`` while a search runs): as ``"finish"``, except that a
          ponder/infinite search (the GUI forgot ``stop``, breaking the protocol) is never
          answered: its move is for another position and would read as the new ``go``'s answer.
        """
        job = self._job
        if job is None:
            return
        with self._lock:
            if job.hold:
                if how == "replace":
                    job.discard = True
                    job.answer = None
                else:
                    job.hold = False
                    if job.answer is not None:
                        self.send(job.answer)
                        job.answer = None
                job.stop.set()
            elif how == "stop":
                job.stop.set()
        if job.thread is not None:
            job.thread.join()
        self._job = None

    def _deliver(self, job: _Job, answer: str) -> None:
        with self._lock:
            if job.discard:
                return
            if job.hold:
                job.answer = answer
            else:
                self.send(answer)

    def _run(self, job: _Job) -> None:
        """The search thread: search (or one forward pass), info lines, then the answer."""
        try:
            answer = self._raw_answer(job) if job.raw else self._search_answer(job)
        except Exception as exc:  # a failed forward pass: say so, fall back to the raw policy
            if not job.discard:
                self.send(f"info string error: {type(exc).__name__}: {exc}")
            try:
                answer = self._raw_answer(job)
            except Exception:
                answer = "bestmove resign"
        self._deliver(job, answer)

    def _raw_answer(self, job: _Job) -> str:
        board = job.board
        if board.is_nyugyoku():
            return "bestmove win"
        move, value = self.player.policy_move(board, job.ply, job.repetition)
        if move == "resign":
            return "bestmove resign"
        best = cshogi.move_to_usi(move)
        ms = int((time.perf_counter() - job.t0) * 1000)
        if not job.discard:
            self.send(f"info depth 1 seldepth 1 nodes 1 time {ms} score cp {value_to_cp(value)} pv {best}")
        return f"bestmove {best}"

    def _info_line(self, res, job: _Job) -> str:
        ms = int((time.perf_counter() - job.t0) * 1000)
        if res.mate_in is not None:
            score = f"mate {res.mate_in}"
        else:
            score = f"cp {value_to_cp(res.value)}"
        depth = max(1, res.depth)
        return (f"info depth {depth} seldepth {max(depth, res.seldepth)} nodes {res.nodes} "
                f"nps {int(res.nps)} time {ms} score {score} pv {' '.join(res.pv)}")

    def _search_answer(self, job: _Job) -> str:
        interval = self.values["InfoInterval"]

        def on_info(res) -> None:
            if not job.discard and res.pv:
                self.send(self._info_line(res, job))

        res = self.mcts.search(job.board, ply=job.ply, limits=job.limits, stop_event=job.stop,
                               info=on_info if interval > 0 else None, info_interval=interval / 1000.0)
        if res.best_move == 0:  # "win" or "resign": no move to show
            return f"bestmove {res.best_usi}"
        if res.mate_in is None and self._mates_at_once(res.best_move):
            res.mate_in = 1
        if not job.discard:
            self.send(self._info_line(res, job))
        ponder = res.ponder_usi
        return f"bestmove {res.best_usi}" + (f" ponder {ponder}" if ponder else "")

    def _mates_at_once(self, move: int) -> bool:
        from keisei_stream.shogi import EndReason

        root = self.mcts.root
        if root is None:
            return False
        child = root.children.get(root.child_index(move))
        return child is not None and child.terminal == -1.0 and child.reason == int(EndReason.CHECKMATE)


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
