"""An external USI engine as a player: :class:`UsiEnginePlayer` runs the engine in a subprocess
and speaks the USI protocol (http://shogidokoro.starfree.jp/usi.html) to it over pipes.

A reader thread moves the engine's output lines into a queue, so every wait has a deadline: an
engine that does not answer in time is killed (``PlayerError("timeout")``), one that exits or
closes its output gives ``PlayerError("crash")``; the next :meth:`UsiEnginePlayer.new_game`
starts it again.
"""

from __future__ import annotations

import queue
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import cshogi

from keisei_stream.play.players import STARTPOS, PlayerError, SpecError

_GO_TIME = re.compile(r"\b(movetime|byoyomi)\s+(\d+)")


def default_move_timeout(go: str) -> float:
    """Seconds to wait for ``bestmove`` after ``go``: 3 x the fixed time (``movetime``/``byoyomi``
    milliseconds) + 5 s, else 60 s (``nodes``/``depth`` searches)."""
    m = _GO_TIME.search(go)
    if m:
        return 3.0 * int(m.group(2)) / 1000.0 + 5.0
    return 60.0


class UsiEnginePlayer:
    """An external USI engine in a subprocess, started at the first :meth:`new_game`.

    Args:
        command: the engine's command line (list, or a string split with :func:`shlex.split`).
        options: ``setoption name K value V`` sent after ``usi`` for each item.
        go: the ``go`` command sent for each move, e.g. ``"go nodes 1000"``, ``"go depth 3"``,
            ``"go movetime 100"``, ``"go byoyomi 1000"`` (``btime 0 wtime 0`` is added to a
            byoyomi-only ``go`` as the protocol expects).
        timeout_s: seconds to wait for each ``bestmove`` (default :func:`default_move_timeout`);
            past it the process is killed and :class:`PlayerError` ``"timeout"`` raised.
        startup_timeout_s: seconds for ``usiok`` / ``readyok``.
        name: shown in results (default: the engine's ``id name``, else the program name).
        cwd: working directory of the engine process (default: this process's).

    Raises:
        SpecError: an empty command.
        PlayerError: ``"crash"`` (process exits, closes stdout, cannot be started) or
            ``"timeout"`` from :meth:`new_game` / :meth:`choose`.
    """

    def __init__(self, command: Union[str, Sequence[str]], options: Optional[dict] = None,
                 go: str = "go byoyomi 1000", timeout_s: Optional[float] = None,
                 startup_timeout_s: float = 30.0, name: Optional[str] = None, cwd: Optional[str] = None):
        self.command = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.command:
            raise SpecError("empty USI engine command")
        self.options = dict(options or {})
        go = go.strip()
        if not go.startswith("go"):
            go = "go " + go
        if "byoyomi" in go and "btime" not in go:
            go = go.replace("go", "go btime 0 wtime 0", 1)
        self.go = go
        self.timeout_s = float(timeout_s) if timeout_s else default_move_timeout(go)
        self.startup_timeout_s = startup_timeout_s
        self.cwd = cwd
        self._fixed_name = name
        self.name = name or Path(self.command[0]).name
        self.engine_name: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.start_sfen = STARTPOS
        self.restarts = 0

    # -- process management
    def _start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, encoding="utf-8", errors="replace", bufsize=1, cwd=self.cwd,
            )
        except OSError as exc:
            self.proc = None
            raise PlayerError("crash", f"cannot start {self.command!r}: {exc}") from None
        self._lines = queue.Queue()
        t = threading.Thread(target=self._reader, args=(self.proc, self._lines), daemon=True)
        t.start()
        self._send("usi")
        for line in self._until(lambda s: s == "usiok", self.startup_timeout_s, "usiok"):
            if line.startswith("id name "):
                self.engine_name = line[8:].strip()
                if not self._fixed_name:
                    self.name = self.engine_name
        for k, v in self.options.items():
            self._send(f"setoption name {k} value {v}")
        self._send("isready")
        list(self._until(lambda s: s == "readyok", self.startup_timeout_s, "readyok"))

    @staticmethod
    def _reader(proc: subprocess.Popen, q: "queue.Queue[Optional[str]]") -> None:
        try:
            for line in proc.stdout:
                q.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        q.put(None)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _send(self, line: str) -> None:
        if self.proc is None:
            raise PlayerError("crash", "engine not running")
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._kill()
            raise PlayerError("crash", f"engine closed its input (while sending {line.split()[0]!r})") from None

    def _until(self, done, timeout_s: float, what: str):
        """Yield engine lines until ``done(line)``; PlayerError on EOF or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                self._kill()
                raise PlayerError("timeout", f"no {what} within {timeout_s:.1f} s; engine killed") from None
            if line is None:
                code = self.proc.wait(timeout=5) if self.proc is not None else None
                self._kill()
                raise PlayerError("crash", f"engine exited (code {code}) while waiting for {what}")
            yield line
            if done(line):
                return

    def _kill(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for s in (p.stdin, p.stdout):
            try:
                s.close()
            except OSError:  # flushing a pipe whose reader is gone
                pass

    # -- Player protocol
    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        """(Re)start the engine if it is not running (``usi``, options, ``isready``), then
        ``usinewgame``; ``moves`` and ``seed`` are not needed (:meth:`choose` sends the whole game).

        Raises:
            PlayerError: ``"crash"`` or ``"timeout"`` (the engine is then killed).
        """
        self.start_sfen = start_sfen
        if not self._alive():
            if self.proc is not None:
                self._kill()
            if self.engine_name is not None:
                self.restarts += 1
            self._start()
        self._send("usinewgame")

    def choose(self, board: cshogi.Board, ply: int) -> str:
        """Send ``position`` (the start and ``board.history``) and ``go``; return the ``bestmove``
        text (a USI move, ``"resign"`` or ``"win"``), not checked here.

        Raises:
            PlayerError: ``"crash"``, ``"timeout"`` (after ``timeout_s``; the engine is killed), or
                ``"illegal"`` for an empty ``bestmove``.
        """
        if not self._alive():
            raise PlayerError("crash", "engine is not running")
        moves = " ".join(cshogi.move_to_usi(m) for m in board.history)
        pos = "position startpos" if self.start_sfen == STARTPOS else f"position sfen {self.start_sfen}"
        self._send(pos + (" moves " + moves if moves else ""))
        self._send(self.go)
        best = None
        for line in self._until(lambda s: s.startswith("bestmove"), self.timeout_s, "bestmove"):
            if line.startswith("bestmove"):
                parts = line.split()
                best = parts[1] if len(parts) > 1 else ""
        if not best:
            raise PlayerError("illegal", "empty bestmove")
        return best

    def game_over(self, result: str) -> None:
        """Send ``gameover win|lose|draw`` to a running engine; errors are ignored."""
        if self._alive():
            try:
                self._send(f"gameover {result}")
            except PlayerError:
                pass

    def close(self) -> None:
        """Send ``quit``, wait up to 3 s for the engine to exit, then kill it."""
        if self._alive():
            try:
                self._send("quit")
                self.proc.wait(timeout=3)
            except (PlayerError, subprocess.TimeoutExpired):
                pass
        self._kill()
