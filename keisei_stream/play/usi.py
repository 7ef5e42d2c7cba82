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
``#!/bin/sh`` / ``exec /path/to/python -m keisei_stream.play.usi --checkpoint /path/ckpt.pt``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import IO, Optional

import cshogi

ENGINE_NAME = "keisei-stream"
AUTHOR = "keisei-stream contributors"


def value_to_cp(v: float) -> int:
    """Value in [-1, 1] -> centipawns on the 600 logistic scale (clamped to +-30000)."""
    p = min(max((v + 1.0) / 2.0, 1e-9), 1.0 - 1e-9)
    return int(max(-30000, min(30000, round(600.0 * math.log(p / (1.0 - p))))))


_MAX_PIECES = {"p": 18, "l": 4, "n": 4, "s": 4, "g": 4, "b": 2, "r": 2}
_HAND_RE = re.compile(r"^(?:-|(?:\d{0,2}[PLNSGBRplnsgbr])+)$")


def check_sfen(text: str) -> str:
    """Validate a SFEN (``board side hand [move]``) before cshogi sees it, since
    ``cshogi.Board.set_sfen`` aborts the process on some malformed strings.

    Checks: 9 ranks of 9 squares (``+`` only before P L N S B R), side ``b``/``w``, hand syntax,
    exactly one king per side, at most the standard number of each piece (board + hands).

    Returns:
        the normalised SFEN (move number ``1`` added when missing).

    Raises:
        ValueError: with the reason.
    """
    f = text.split()
    if len(f) == 3:
        f.append("1")
    if len(f) != 4:
        raise ValueError(f"bad sfen {text!r}: expected 'board side hand [move]'")
    board, side, hand, move = f
    if side not in ("b", "w") or not move.isdigit() or not _HAND_RE.match(hand):
        raise ValueError(f"bad sfen {text!r}")
    counts: dict[str, int] = {}
    ranks = board.split("/")
    if len(ranks) != 9:
        raise ValueError(f"bad sfen {text!r}: {len(ranks)} ranks")
    for rank in ranks:
        n, i = 0, 0
        while i < len(rank):
            c = rank[i]
            if c.isdigit() and c != "0":
                n += int(c)
            elif c == "+" and i + 1 < len(rank) and rank[i + 1].lower() in "plnsbr":
                pass
            elif c.lower() in "plnsgbrk":
                counts[c] = counts.get(c, 0) + 1
                n += 1
            else:
                raise ValueError(f"bad sfen {text!r}: character {c!r}")
            i += 1
        if n != 9:
            raise ValueError(f"bad sfen {text!r}: rank {rank!r} has {n} squares")
    if counts.get("K", 0) != 1 or counts.get("k", 0) != 1:
        raise ValueError(f"bad sfen {text!r}: each side needs exactly one king")
    if hand != "-":
        for num, c in re.findall(r"(\d*)([PLNSGBRplnsgbr])", hand):
            counts[c] = counts.get(c, 0) + (int(num) if num else 1)
    for p, mx in _MAX_PIECES.items():
        if counts.get(p, 0) + counts.get(p.upper(), 0) > mx:
            raise ValueError(f"bad sfen {text!r}: too many {p.upper()}")
    return " ".join(f)


def parse_position(tokens: list[str]) -> tuple[cshogi.Board, str, list[str], Optional[str]]:
    """``position`` arguments -> ``(board, start_sfen or "startpos", moves played, error or None)``.

    The board ends after the last legal move of the list; an illegal or malformed move stops the
    replay (its text is in the error).
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
            start = check_sfen(" ".join(head[1:5]))
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
        self.out.write(line + "\n")
        self.out.flush()
        if self.log is not None:
            self.log.write(f"> {line}\n")
            self.log.flush()

    # -- model
    def _ensure_player(self):
        from keisei_stream.play.players import ModelPlayer

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
        """Process one line; returns False on ``quit``."""
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
    """Serve the USI protocol until ``quit`` or end of input. Returns 0."""
    engine = UsiEngine(checkpoint, out, temperature, device, seed, name, log, threads)
    while True:
        line = inp.readline()
        if not line:
            return 0
        if not engine.handle(line):
            return 0


def add_usi_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``keisei usi``."""
    p.add_argument("--checkpoint", required=True, help="checkpoint file (ckpt_*.pt)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = argmax (default); USI option Temperature")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (USI option Device)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (USI option Seed)")
    p.add_argument("--name", default=None, help="id name (default: keisei-stream <checkpoint stem>)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: fastest per move)")
    p.add_argument("--log", default=None, help="append the protocol dialogue to this file")


def main(args) -> int:
    """``keisei usi`` entry: ``args`` from :func:`add_usi_arguments` (or an argv list)."""
    if args is None or isinstance(args, list):
        p = argparse.ArgumentParser(prog="keisei usi", description="the policy as a USI engine")
        add_usi_arguments(p)
        args = p.parse_args(args)
    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    if args.temperature < 0:
        print("error: --temperature must be >= 0", file=sys.stderr)
        return 2
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    try:
        return run_engine(sys.stdin, sys.stdout, args.checkpoint, temperature=args.temperature,
                          device=args.device, seed=args.seed, name=args.name, log=log,
                          threads=max(1, args.threads))
    finally:
        if log is not None:
            log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
