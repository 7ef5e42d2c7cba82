"""Players for evaluation matches: random, 1-ply material greedy, a trained model, a USI engine.

Every player follows the :class:`Player` protocol:

- ``name``: str shown in results;
- ``new_game(start_sfen="startpos", moves=(), seed=None)``: a game starts from ``start_sfen``
  (``"startpos"`` or a full SFEN) after ``moves`` (USI strings: the random opening, if any) were
  already played; ``seed`` makes the player's own randomness reproducible per game;
- ``choose(board, ply) -> str | int``: the move for the side to move of ``board`` (a
  ``cshogi.Board`` whose ``history`` holds every move since ``start_sfen``), as a cshogi move
  code or a USI string (``"resign"`` and ``"win"``, the entering-king declaration, are allowed);
  ``ply`` = moves played so far (opening included). The referee, not the player, judges legality;
- ``game_over(result)``: optional notification, ``result`` in ``"win" | "lose" | "draw"``;
- ``close()``: release processes and memory.

A player that cannot answer raises :class:`PlayerError` with ``reason`` ``"timeout"`` (no
answer in time; the engine process is killed), ``"crash"`` (the engine process died or closed its
output) or ``"illegal"`` (unparseable answer); the referee (:mod:`keisei_stream.play.evaluation`)
scores that game as a loss with the reason and the match goes on (a USI engine is restarted at
the next ``new_game``).

Players are built from **spec strings** (:func:`make_player`), so that worker processes of a
match receive text, never live objects::

    random | greedy
    checkpoint:PATH[;temperature=T][;device=D][;name=N]
    redis:URL#RUN@VERSION|latest|sha256:HEX[;temperature=T][;device=D][;name=N]
    usi:COMMAND LINE[;go=go byoyomi 1000][;timeout=S][;option.NAME=VALUE]...[;name=N]

Options are separated by ``;``; the USI command line is split with :func:`shlex.split`.
"""

from __future__ import annotations

import hashlib
import math
import queue
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import cshogi
import numpy as np

STARTPOS = "startpos"

# ------------------------------------------------------------------------------------------------
# material values

#: Piece values indexed by cshogi piece type (0 = none, 1 PAWN, 2 LANCE, 3 KNIGHT, 4 SILVER,
#: 5 BISHOP, 6 ROOK, 7 GOLD, 8 KING, 9 +P, 10 +L, 11 +N, 12 +S, 13 HORSE, 14 DRAGON), in
#: centipawn-like units. Source: the material values of Bonanza 6.0 as kept in YaneuraOu's
#: ``source/evaluate.h`` (PawnValue 90, LanceValue 315, KnightValue 405, SilverValue 495,
#: GoldValue 540, BishopValue 855, RookValue 990, ProPawn/ProLance/ProKnight/ProSilver 540,
#: HorseValue 945, DragonValue 1395); the king is given 15000 (never captured in legal play).
PIECE_VALUES = np.array(
    [0, 90, 315, 405, 495, 855, 990, 540, 15000, 540, 540, 540, 540, 945, 1395, 0], dtype=np.int64
)
#: Gain of promoting a piece of each (unpromoted) type: value(promoted) - value(piece).
PROMOTION_GAIN = np.zeros(16, dtype=np.int64)
for _pt, _ppt in ((1, 9), (2, 10), (3, 11), (4, 12), (5, 13), (6, 14)):
    PROMOTION_GAIN[_pt] = PIECE_VALUES[_ppt] - PIECE_VALUES[_pt]


def move_gains(moves: np.ndarray) -> np.ndarray:
    """1-ply material gain of cshogi move codes: captured value + promotion gain.

    Args:
        moves: ``(K,)`` uint32 cshogi move codes (bits 14 = promotion, 16-19 = moved piece type,
            20-23 = captured piece type; see ``cshogi.move_cap`` / ``move_from_piece_type``).

    Returns:
        ``(K,)`` int64 gains in :data:`PIECE_VALUES` units.
    """
    m = moves.astype(np.int64)
    cap = (m >> 20) & 0xF
    moved = (m >> 16) & 0xF
    promo = (m >> 14) & 1
    return PIECE_VALUES[cap] + promo * PROMOTION_GAIN[moved]


# ------------------------------------------------------------------------------------------------
# protocol and errors


class PlayerError(Exception):
    """A player failed to produce a move; ``reason`` is ``"timeout"``, ``"crash"`` or ``"illegal"``."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


class SpecError(ValueError):
    """A player spec string is malformed or names something that cannot be loaded."""


class Player(Protocol):
    name: str

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None: ...

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]: ...

    def close(self) -> None: ...


def _legal_array(board: cshogi.Board) -> np.ndarray:
    return np.fromiter(board.legal_moves, dtype=np.uint32)


class RandomPlayer:
    """Uniformly random legal move (cshogi's legal move generator)."""

    def __init__(self, seed: int = 0, name: str = "random"):
        self.name = name
        self.rng = np.random.default_rng(seed)

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def choose(self, board: cshogi.Board, ply: int) -> int:
        legal = _legal_array(board)
        if len(legal) == 0:
            return "resign"
        return int(legal[self.rng.integers(len(legal))])

    def close(self) -> None:
        pass


class GreedyPlayer(RandomPlayer):
    """1-ply material greedy: the move with the largest :func:`move_gains` (capture of the most
    valuable piece, plus promotion gain), ties broken uniformly at random; with no capture or
    promotion available, a uniformly random legal move."""

    def __init__(self, seed: int = 0, name: str = "greedy"):
        super().__init__(seed, name)

    def choose(self, board: cshogi.Board, ply: int) -> int:
        legal = _legal_array(board)
        if len(legal) == 0:
            return "resign"
        gains = move_gains(legal)
        best = np.flatnonzero(gains == gains.max())
        return int(legal[best[self.rng.integers(len(best))]])


# ------------------------------------------------------------------------------------------------
# model player


def load_model_from_checkpoint(path: Union[str, Path], device: str = "cpu"):
    """Build the model described by a checkpoint's ``config_json`` and load its weights
    (``keisei_stream.rl.checkpoint.load_model_from_checkpoint``: ``torch.load(weights_only=True)``,
    RNG states untouched).

    Args:
        path: a ``ckpt_*.pt`` file written by ``keisei_stream.rl.checkpoint.save_checkpoint``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``.

    Returns:
        ``(model (eval mode, on device), config: keisei_stream.config.Config, meta: dict)`` with
        ``meta`` = version, updates, extra.

    Raises:
        SpecError: missing/unreadable file, bad stored config, unavailable device.
    """
    from keisei_stream.rl import checkpoint
    from keisei_stream.config import ConfigError

    dev = _device(device)
    try:
        model, info = checkpoint.load_model_from_checkpoint(path, map_location="cpu")
    except (checkpoint.CheckpointError, ConfigError) as exc:
        raise SpecError(str(exc)) from None
    cfg = info.pop("config")
    info.pop("config_json", None)
    model.to(dev).eval()
    return model, cfg, info


def load_model_from_redis(url: str, run: str, version: Union[int, str] = "latest", device: str = "cpu"):
    """Build a run's model from Redis: config from ``keisei:{run}:config``, weights from
    ``weights:latest`` (``version="latest"``), from the blob of an exact version (looked up in the
    ``weights:index`` sorted set; only the last ``stream.weights_keep`` are kept) or
    ``"sha256:HEX"``. The blob's SHA-256 is verified.

    Returns:
        ``(model, config, meta)`` with ``meta = {"version": int | None, "sha256": str}``.

    Raises:
        SpecError: missing config or weights, or a checksum mismatch.
    """
    from keisei_stream.rl import checkpoint
    from keisei_stream.config import ConfigError, config_from_json
    from keisei_stream.wire.keys import Keys
    from keisei_stream.rl.model import build_model

    r = _connect(url)
    keys = Keys(run)
    cfg_text = r.get(keys.config)
    if cfg_text is None:
        raise SpecError(f"run {run!r} has no config in Redis ({keys.config})")
    try:
        cfg = config_from_json(cfg_text)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    ver: Optional[int]
    version = str(version)
    if version == "latest":
        from keisei_stream.wire import weights

        try:
            got = weights.read_latest_weights(r, keys)
        except weights.WeightsError as exc:
            raise SpecError(f"run {run!r}: {exc}") from None
        if got is None:
            raise SpecError(f"run {run!r} has no published weights")
        ver, sha, data = got
    else:
        if version.startswith("sha256:"):
            sha = version[7:].lower()
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise SpecError(f"bad sha256 {sha!r}")
            score = r.zscore(keys.weights_index, sha)
            ver = int(score) if score is not None else None
        else:
            try:
                ver = int(version)
            except ValueError:
                raise SpecError(f"bad weights version {version!r}") from None
            shas = r.zrangebyscore(keys.weights_index, ver, ver)
            if not shas:
                h = {_s(k): _s(v) for k, v in (r.hgetall(keys.weights_latest) or {}).items()}
                if h.get("version") == str(ver):
                    shas = [h["sha256"]]
            if not shas:
                raise SpecError(f"weights version {ver} of run {run!r} is not (or no longer) in Redis")
            sha = _s(shas[0])
        data = r.get(keys.weights_blob(sha))
    if data is None:
        raise SpecError(f"weights blob {sha} of run {run!r} is missing")
    if hashlib.sha256(data).hexdigest() != sha:
        raise SpecError(f"weights blob {sha} fails its SHA-256 check")
    dev = _device(device)
    model = build_model(cfg.model)
    try:
        checkpoint.load_weights_bytes(model, data)
    except ValueError as exc:
        raise SpecError(f"weights blob {sha}: {exc}") from None
    model.to(dev).eval()
    return model, cfg, {"version": ver, "sha256": sha}


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _connect(url: str):
    try:
        from keisei_stream.wire.embedded_redis import connect

        return connect(url)
    except ImportError:  # pragma: no cover - helper C's module is part of the package
        import redis

        return redis.Redis.from_url(url)


def _device(name: str):
    from keisei_stream.rl.model import pick_device

    try:
        return pick_device(name)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


class ModelPlayer:
    """The policy network as a player: one forward pass per move.

    Args:
        source: a checkpoint path, or a ``(model, config)`` pair already loaded.
        temperature: 0 = argmax of the legal logits; > 0 samples ``softmax(logits / T)`` over the
            legal moves.
        device: torch device name (``"cpu"``, ``"cuda"``, ``"auto"``).
        name: shown in results (default: the file name).
        seed: seed of the sampling generator (temperature > 0).
        threads: torch intra-op threads to set for this process (default 1; None = leave as is).

    The observation is ``keisei_stream.shogi.encode_observation(board, ply, repetition,
    cfg.env.max_plies)`` ``(46, 9, 9) float32``, with ``repetition`` = earlier occurrences of the
    position in this game (counted from the positions seen since :meth:`new_game`, opening
    included) and the model's own training ``max_plies``; the legal moves and their action
    indices come from ``keisei_stream.shogi.legal_moves_and_actions``.

    Raises:
        SpecError: from the loaders when the source cannot be loaded.
    """

    def __init__(self, source, temperature: float = 0.0, device: str = "cpu", name: Optional[str] = None,
                 seed: int = 0, threads: Optional[int] = 1):
        import torch

        if threads:
            # one position per forward pass: intra-op threads cost more than they give on tensors
            # this small, and their spin-waits stall badly on a busy machine (measured here: 1 ms
            # per move with 1 thread, 150-250 ms with 2 on a loaded 2-core box). Matches get
            # their parallelism from processes instead. Note: process-wide setting.
            torch.set_num_threads(threads)

        if isinstance(source, tuple):
            self.model, self.config = source[0], source[1]
            self.meta: dict = source[2] if len(source) > 2 else {}
            default_name = "model"
        else:
            self.model, self.config, self.meta = load_model_from_checkpoint(source, device)
            default_name = Path(source).stem
        if temperature < 0 or not math.isfinite(temperature):
            raise SpecError(f"temperature must be >= 0, got {temperature}")
        self.name = name or default_name
        self.temperature = float(temperature)
        self.device = next(self.model.parameters()).device if any(True for _ in self.model.parameters()) else torch.device("cpu")
        self.model.eval()
        self.max_plies = int(self.config.env.max_plies)
        self.generator = torch.Generator().manual_seed(seed)
        self._counts: dict[int, int] = {}

    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        self._counts = {}
        if seed is not None:
            self.generator.manual_seed(seed)
        # count the positions before each opening move; the position after the opening is
        # counted by choose() when it is this player's turn there
        b = cshogi.Board() if start_sfen == STARTPOS else cshogi.Board(start_sfen)
        for mv in moves:
            self._seen(b)
            b.push_usi(mv)

    def _seen(self, board: cshogi.Board) -> int:
        key = board.zobrist_hash()
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return n

    def choose(self, board: cshogi.Board, ply: int) -> Union[str, int]:
        # a position repeats with the same side to move, i.e. at this player's turns only, so
        # counting here (plus the opening in new_game) sees every earlier occurrence.
        repetition = min(self._seen(board), 2)
        move, _ = self.policy_move(board, ply, repetition)
        return move

    def policy_move(self, board: cshogi.Board, ply: int, repetition: int = 0) -> tuple[Union[str, int], float]:
        """One forward pass: ``(move, value)``.

        Args:
            board: position (side to move = the player); not modified.
            ply: moves played since the game's start; repetition: earlier occurrences (0..2).

        Returns:
            ``move``: cshogi move code (``"resign"`` when there is no legal move); ``value``:
            the value head in [-1, 1] for the side to move (0.0 without legal moves).
        """
        import torch

        from keisei_stream.shogi import encode_observation, legal_moves_and_actions

        moves, actions = legal_moves_and_actions(board)
        if len(moves) == 0:
            return "resign", 0.0
        obs = encode_observation(board, ply, min(max(int(repetition), 0), 2), self.max_plies)
        with torch.inference_mode():
            x = torch.from_numpy(obs)[None].to(self.device)
            logits, value = self.model(x)
            legal_logits = logits[0].float().cpu()[torch.from_numpy(np.asarray(actions, dtype=np.int64))]
            if self.temperature == 0.0:
                i = int(torch.argmax(legal_logits))
            else:
                probs = torch.softmax(legal_logits / self.temperature, dim=0)
                i = int(torch.multinomial(probs, 1, generator=self.generator))
            v = float(value.reshape(-1)[0])
        return int(moves[i]), v

    def close(self) -> None:
        self.model = None


# ------------------------------------------------------------------------------------------------
# USI engine player

_GO_TIME = re.compile(r"\b(movetime|byoyomi)\s+(\d+)")


def default_move_timeout(go: str) -> float:
    """Seconds to wait for ``bestmove`` after ``go``: 3 x the fixed time (``movetime``/``byoyomi``
    milliseconds) + 5 s, else 60 s (``nodes``/``depth`` searches)."""
    m = _GO_TIME.search(go)
    if m:
        return 3.0 * int(m.group(2)) / 1000.0 + 5.0
    return 60.0


class UsiEnginePlayer:
    """An external USI engine in a subprocess (USI protocol: http://shogidokoro.starfree.jp/usi.html).

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

    Raises:
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
            except Exception:
                pass

    # -- Player protocol
    def new_game(self, start_sfen: str = STARTPOS, moves: Sequence[str] = (), seed: Optional[int] = None) -> None:
        self.start_sfen = start_sfen
        if not self._alive():
            if self.proc is not None:
                self._kill()
            if self.engine_name is not None:
                self.restarts += 1
            self._start()
        self._send("usinewgame")

    def choose(self, board: cshogi.Board, ply: int) -> str:
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
        if self._alive():
            try:
                self._send(f"gameover {result}")
            except PlayerError:
                pass

    def close(self) -> None:
        if self._alive():
            try:
                self._send("quit")
                self.proc.wait(timeout=3)
            except (PlayerError, subprocess.TimeoutExpired):
                pass
        self._kill()


# ------------------------------------------------------------------------------------------------
# specs


@dataclass
class PlayerSpec:
    """A parsed spec string: ``kind`` in random/greedy/checkpoint/redis/usi, ``body`` and options."""

    kind: str
    body: str = ""
    options: dict = field(default_factory=dict)
    text: str = ""


def parse_spec(spec: str) -> PlayerSpec:
    """Parse a player spec string (grammar in the module docstring).

    Raises:
        SpecError: unknown kind, missing body, malformed option.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty player spec")
    parts = [p.strip() for p in spec.strip().split(";")]
    head, opts = parts[0], {}
    for p in parts[1:]:
        if not p:
            continue
        if "=" not in p:
            raise SpecError(f"player spec {spec!r}: option {p!r} is not key=value")
        k, v = p.split("=", 1)
        opts[k.strip()] = v.strip()
    kind, _, body = head.partition(":")
    kind = kind.strip().lower()
    if kind in ("random", "greedy"):
        if body:
            raise SpecError(f"player spec {spec!r}: {kind} takes no argument")
    elif kind in ("checkpoint", "redis", "usi"):
        if not body.strip():
            raise SpecError(f"player spec {spec!r}: {kind}: needs an argument")
    else:
        raise SpecError(f"unknown player kind {kind!r} in {spec!r} (random, greedy, checkpoint:, redis:, usi:)")
    return PlayerSpec(kind, body.strip(), opts, spec)


def parse_redis_body(body: str) -> tuple[str, str, str]:
    """``URL#RUN@VERSION`` -> ``(url, run, version)``; ``@VERSION`` defaults to ``latest``.

    Raises:
        SpecError: without ``#RUN``.
    """
    if "#" not in body:
        raise SpecError(f"redis player {body!r}: expected URL#RUN[@VERSION|latest]")
    url, rest = body.rsplit("#", 1)
    run, _, version = rest.partition("@")
    if not url or not run:
        raise SpecError(f"redis player {body!r}: expected URL#RUN[@VERSION|latest]")
    return url, run, version or "latest"


def make_player(spec: str, *, seed: int = 0, temperature: float = 0.0, device: str = "cpu") -> Player:
    """Build a player from a spec string.

    Args:
        spec: see the module docstring.
        seed: seed of the player's randomness.
        temperature, device: defaults for model players (``;temperature=`` / ``;device=`` win).

    Raises:
        SpecError: bad spec or unloadable model; PlayerError: a USI engine that fails to start
            is not started here (it starts at its first ``new_game``).
    """
    ps = parse_spec(spec)
    o = ps.options
    name = o.get("name")
    if ps.kind == "random":
        return RandomPlayer(seed, name or "random")
    if ps.kind == "greedy":
        return GreedyPlayer(seed, name or "greedy")
    if ps.kind in ("checkpoint", "redis"):
        try:
            temp = float(o.get("temperature", temperature))
        except ValueError:
            raise SpecError(f"bad temperature in {spec!r}") from None
        dev = o.get("device", device)
        if ps.kind == "checkpoint":
            return ModelPlayer(ps.body, temperature=temp, device=dev, name=name, seed=seed)
        url, run, version = parse_redis_body(ps.body)
        model, cfg, meta = load_model_from_redis(url, run, version, dev)
        default = f"{run}@v{meta['version']}" if meta.get("version") is not None else f"{run}@{meta['sha256'][:12]}"
        return ModelPlayer((model, cfg, meta), temperature=temp, device=dev, name=name or default, seed=seed)
    # usi
    setopts = {k[len("option."):]: v for k, v in o.items() if k.startswith("option.")}
    unknown = [k for k in o if not k.startswith("option.") and k not in ("go", "timeout", "name", "cwd")]
    if unknown:
        raise SpecError(f"unknown usi player option(s) {unknown} in {spec!r}")
    try:
        timeout = float(o["timeout"]) if "timeout" in o else None
    except ValueError:
        raise SpecError(f"bad timeout in {spec!r}") from None
    return UsiEnginePlayer(ps.body, setopts, go=o.get("go", "go byoyomi 1000"), timeout_s=timeout,
                           name=name, cwd=o.get("cwd"))
