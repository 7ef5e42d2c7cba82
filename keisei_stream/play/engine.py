"""The trained policy as a USI engine on stdin/stdout (``keisei usi --checkpoint FILE``).

Protocol: USI (http://shogidokoro.starfree.jp/usi.html, the USI 2.0 description). Handled:

- ``usi`` -> ``id name``, ``id author``, ``option`` lines, ``usiok`` (answered before torch is
  imported, so GUIs register the engine quickly);
- ``setoption name N value V``: ``Temperature`` (string, float >= 0; 0 = argmax), ``Device``
  (string: cpu | cuda | cuda:N | auto), ``Seed`` (spin), ``USI_Ponder`` / ``USI_Hash``
  (accepted, no effect); unknown names are ignored;
- ``isready`` -> loads the model (once; again after a Device change) -> ``readyok``;
- ``usinewgame``, ``gameover ...``: accepted;
- ``position startpos|sfen <sfen> [moves m1 m2 ...]``: replayed with cshogi (an illegal move
  stops the replay and is reported as ``info string``);
- ``go`` with any time control (``btime wtime byoyomi binc winc movetime nodes depth infinite
  ponder``; the engine needs one forward pass whatever the budget) -> ``info depth 1 ... score cp
  X pv MOVE`` and ``bestmove MOVE``; ``bestmove win`` when the side to move can declare entering
  king (``board.is_nyugyoku()``), ``bestmove resign`` without a legal move. After ``go ponder`` or
  ``go infinite`` the answer is held until ``stop`` or ``ponderhit``, as the protocol requires;
- ``go mate ...`` -> ``checkmate notimplemented``; ``stop``, ``ponderhit``, ``quit``.

Anything else is ignored. Every line written is flushed. The ``score cp`` is the value head
``v`` in [-1, 1] mapped through ``p = (v + 1) / 2``, ``cp = 600 * ln(p / (1 - p))`` (the usual
600-centipawn logistic scale of shogi engines), clamped to +-30000.

Use with a GUI (ShogiGUI, Shogidokoro, ShogiHome): register a small script as the engine, e.g.
``#!/bin/sh`` / ``exec /path/to/python -m keisei_stream.cli usi --checkpoint /path/ckpt.pt``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import IO, Optional

import cshogi

from keisei_stream.shogi import validate_sfen

ENGINE_NAME = "keisei-stream"
AUTHOR = "keisei-stream contributors"


def value_to_cp(v: float) -> int:
    """Value in [-1, 1] -> centipawns on the 600 logistic scale (clamped to +-30000)."""
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


class UsiEngine:
    """The engine's state machine; :meth:`handle` takes one input line and writes answers to ``out``.

    Args:
        checkpoint: path of the checkpoint (loaded at ``isready`` or the first ``go``).
        out: text stream for answers (flushed after each line).
        temperature, device, seed: initial option values.
        name: the ``id name`` (default ``keisei-stream <checkpoint stem>``).
        log: text stream that receives the dialogue (``< `` input, ``> `` output lines), or None.
        threads: torch intra-op threads (1 is fastest for one position per move).
    """

    def __init__(self, checkpoint: str, out: IO[str], temperature: float = 0.0, device: str = "cpu",
                 seed: int = 0, name: Optional[str] = None, log: Optional[IO[str]] = None, threads: int = 1):
        self.checkpoint = checkpoint
        self.threads = threads
        self.out = out
        self.log = log
        self.options = {"Temperature": str(temperature), "Device": device, "Seed": str(seed),
                        "USI_Ponder": "false", "USI_Hash": "16"}
        self.name = name or f"{ENGINE_NAME} {Path(checkpoint).stem}"
        self.player = None
        self._loaded_key = None
        self.board = cshogi.Board()
        self.start = "startpos"
        self.moves: list[str] = []
        self.repetition = 0
        self.pending: Optional[str] = None  # bestmove held during go ponder / go infinite

    # -- output
    def send(self, line: str) -> None:
        """Write one answer line to ``out`` (and ``log``), flushed."""
        self.out.write(line + "\n")
        self.out.flush()
        if self.log is not None:
            self.log.write(f"> {line}\n")
            self.log.flush()

    # -- model
    def _ensure_player(self):
        # imported at the first isready/go, not at the top: ``usi`` is answered before torch
        # (about 2 s) is imported, so GUIs register the engine quickly
        from keisei_stream.play.model_player import ModelPlayer

        key = (self.options["Device"],)
        if self.player is None or self._loaded_key != key:
            self.player = ModelPlayer(self.checkpoint, device=self.options["Device"], seed=self._seed(),
                                      threads=self.threads)
            self._loaded_key = key
        try:
            t = float(self.options["Temperature"])
        except ValueError:
            t = 0.0
        self.player.temperature = max(0.0, t) if math.isfinite(t) else 0.0
        return self.player

    def _seed(self) -> int:
        try:
            return int(self.options["Seed"])
        except ValueError:
            return 0

    # -- commands
    def handle(self, line: str) -> bool:
        """Process one input line; returns False on ``quit``.

        An error while handling a line is answered with ``info string error: ...`` (and
        ``bestmove resign`` for ``go``), except at ``isready``, where it is raised: an engine whose
        model cannot be loaded stops.
        """
        if self.log is not None:
            self.log.write(f"< {line}\n")
            self.log.flush()
        tokens = line.strip().split()
        if not tokens:
            return True
        cmd, args = tokens[0], tokens[1:]
        try:
            if cmd == "usi":
                self.send(f"id name {self.name}")
                self.send(f"id author {AUTHOR}")
                self.send(f"option name Temperature type string default {self.options['Temperature']}")
                self.send(f"option name Device type string default {self.options['Device']}")
                self.send(f"option name Seed type spin default {self.options['Seed']} min 0 max 2147483647")
                self.send("option name USI_Ponder type check default false")
                self.send("option name USI_Hash type spin default 16 min 1 max 1024")
                self.send("usiok")
            elif cmd == "isready":
                self._ensure_player()
                self.send("readyok")
            elif cmd == "setoption":
                self._setoption(args)
            elif cmd == "usinewgame":
                if self.player is not None:
                    self.player.generator.manual_seed(self._seed())
            elif cmd == "position":
                self.board, self.start, self.moves, err = parse_position(args)
                self.repetition = self._repetition()
                if err:
                    self.send(f"info string {err}")
            elif cmd == "go":
                self._go(args)
            elif cmd in ("stop", "ponderhit"):
                if self.pending is not None:
                    self.send(self.pending)
                    self.pending = None
            elif cmd == "quit":
                return False
            elif cmd == "gameover":
                self.pending = None
            # anything else (debug, register, unknown): ignored, as the protocol suggests
        except Exception as exc:  # never die on one bad line; a GUI shows info strings
            self.send(f"info string error: {type(exc).__name__}: {exc}")
            if cmd == "go":
                self.send("bestmove resign")
            elif cmd == "isready":
                raise
        return True

    def _setoption(self, args: list[str]) -> None:
        if "name" not in args:
            return
        i = args.index("name")
        if "value" in args:
            j = args.index("value")
            name, value = " ".join(args[i + 1:j]), " ".join(args[j + 1:])
        else:
            name, value = " ".join(args[i + 1:]), ""
        for known in self.options:
            if known.lower() == name.lower():
                self.options[known] = value
                return

    def _repetition(self) -> int:
        """Earlier occurrences (0..2) of the current position in the game given by ``position``."""
        b = cshogi.Board() if self.start == "startpos" else cshogi.Board(self.start)
        key, n = self.board.zobrist_hash(), 0
        for mv in self.moves:
            if b.zobrist_hash() == key:
                n += 1
            b.push_usi(mv)
        return min(n, 2)

    def _go(self, args: list[str]) -> None:
        if args and args[0] == "mate":
            self.send("checkmate notimplemented")
            return
        hold = "ponder" in args or "infinite" in args
        t0 = time.perf_counter()
        board = self.board
        if board.is_nyugyoku():
            best, info = "win", None
        else:
            player = self._ensure_player()
            move, value = player.policy_move(board, len(self.moves), self.repetition)
            if move == "resign":
                best, info = "resign", None
            else:
                best = cshogi.move_to_usi(move)
                ms = int((time.perf_counter() - t0) * 1000)
                info = f"info depth 1 seldepth 1 time {ms} nodes 1 score cp {value_to_cp(value)} pv {best}"
        if info:
            self.send(info)
        answer = f"bestmove {best}"
        if hold:
            self.pending = answer
        else:
            self.send(answer)


def run_engine(inp: IO[str], out: IO[str], checkpoint: str, *, temperature: float = 0.0, device: str = "cpu",
               seed: int = 0, name: Optional[str] = None, log: Optional[IO[str]] = None, threads: int = 1) -> int:
    """Serve the USI protocol on ``inp``/``out`` (text streams) until ``quit`` or end of input.

    Arguments as :class:`UsiEngine`.

    Returns:
        0.

    Raises:
        SpecError: the checkpoint cannot be loaded at ``isready``.
    """
    engine = UsiEngine(checkpoint, out, temperature, device, seed, name, log, threads)
    while True:
        line = inp.readline()
        if not line:
            return 0
        if not engine.handle(line):
            return 0
