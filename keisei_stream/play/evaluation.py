"""Matches between players, judged by cshogi, with Elo; continuous evaluation of a run.

**The referee** (:func:`play_game`): cshogi checks every move and ending.

- A move that is not legal in the position (``board.is_legal``), or an unparseable answer:
  the mover loses (``illegal``). ``"resign"``: the mover loses (``resign``). ``"win"`` (USI
  entering-king declaration): a win if ``board.is_nyugyoku()`` holds, else a loss (``illegal``).
  A player that raises :class:`keisei_stream.play.players.PlayerError` loses with its reason
  (``timeout``: no answer in time, the engine is killed; ``crash``: the engine died).
- After each move: no legal move for the side to move -> ``checkmate`` (the mover wins; cshogi
  forbids pawn-drop mate, so it never happens as a legal move);
  the fourth occurrence of a position (Zobrist hash with hands and side to move, official
  sennichite rule) -> ``board.is_draw()`` tells a plain repetition (``repetition``, draw) from
  perpetual check (``perpetual_check``, the checking side loses);
  the side to move can declare entering king (``board.is_nyugyoku()``, 24/27-point rule) -> it
  wins (``entering_king``; the referee declares for every player);
  ``max_plies`` moves played (random opening included) -> draw (``max_plies``).

**A match** (:func:`play_match`): ``games`` games, colours alternate (game ``i`` even: player A
is Black). With ``opening_plies = k > 0`` both games of a pair (``2j``, ``2j + 1``) start after
the same k uniformly random legal plies (seeded by ``seed`` and ``j``). Games run in
``processes`` worker processes (multiprocessing, ``spawn`` by default); each worker builds its
players from the spec strings once (:func:`keisei_stream.play.players.make_player`), so no live
object crosses a process boundary. Per-game seeds derive from ``(seed, game index)``, so a
match's results do not depend on the number of processes.

**Continuous evaluation** (``keisei eval --follow``, :func:`follow`): polls
``keisei:{run}:weights:latest``; each time the version crosses a multiple of
``eval.every_versions`` (config read from ``keisei:{run}:config``) the newest version (pinned by
its SHA-256) plays ``eval.games`` games against each of ``eval.opponents``. Each match appends
one entry to the ``eval`` stream (``XADD MAXLEN ~ stream.eval_maxlen``) with fields ``version,
opponent, games, wins, losses, draws, score, elo, elo_lo, elo_hi, los, rating, rating_lo,
rating_hi, time`` (infinite Elo bounds written as ``inf``/``-inf``).

**The Elo table** lives in the hash ``keisei:{run}:elo`` (:func:`elo_key`), anchored so that
the uniformly random mover is 0:

- ``anchor:{spec}``: JSON ``{elo, elo_lo, elo_hi, games, ...}`` of each non-random opponent,
  measured once by a match against ``random`` (``random`` itself is 0 by definition);
- ``v:{version:08d}``: JSON of that version's rating: ``version, elo, elo_lo, elo_hi`` (the
  inverse-variance mean of ``anchor + match Elo`` over the opponents, anchors taken as exact),
  ``matches`` (per opponent W/L/D, score, Elo), ``time``;
- ``latest``: the same JSON for the newest evaluated version; ``last_version``: that version.

:func:`latest_rating` reads it for ``keisei status``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cshogi
import numpy as np

from keisei_stream.play import elo as elo_math
from keisei_stream.play.players import STARTPOS, Player, PlayerError, SpecError, make_player

#: Reasons a game ends (strings in records). ``timeout``/``crash``/``illegal``/``resign`` are losses
#: of the player concerned.
REASONS = ("checkmate", "repetition", "perpetual_check", "entering_king", "max_plies",
           "illegal", "resign", "timeout", "crash")


# ------------------------------------------------------------------------------------------------
# one game


def random_opening(plies: int, seed: int, start_sfen: str = STARTPOS, max_tries: int = 100) -> list[str]:
    """``plies`` uniformly random legal moves (USI) from ``start_sfen``, ending in a position where
    the game goes on (legal moves, no repetition, no entering-king declaration).

    Raises:
        ValueError: if no such opening is found in ``max_tries`` attempts.
    """
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        board = cshogi.Board() if start_sfen == STARTPOS else cshogi.Board(start_sfen)
        moves: list[str] = []
        ok = True
        for _ in range(plies):
            legal = np.fromiter(board.legal_moves, dtype=np.uint32)
            if len(legal) == 0:
                ok = False
                break
            m = int(legal[rng.integers(len(legal))])
            moves.append(cshogi.move_to_usi(m))
            board.push(m)
        if ok and not board.is_game_over() and not board.is_nyugyoku() and board.is_draw() == cshogi.NOT_REPETITION:
            return moves
    raise ValueError(f"no playable {plies}-ply random opening found")


def _opp(color: int) -> int:
    return 1 - color


def play_game(black: Player, white: Player, *, max_plies: int = 256, start_sfen: str = STARTPOS,
              opening: Sequence[str] = (), seeds: tuple[Optional[int], Optional[int]] = (None, None)) -> dict:
    """Play one game between two players, cshogi judging every move and the ending.

    Args:
        black, white: :class:`keisei_stream.play.players.Player` objects.
        max_plies: the game is a draw once this many plies have been played (opening included).
        start_sfen: ``"startpos"`` or a SFEN.
        opening: USI moves played before the players take over (must be legal).
        seeds: per-player seeds passed to ``new_game``.

    Raises:
        ValueError: malformed ``start_sfen`` or an illegal opening move.

    Returns:
        dict: ``start_sfen``, ``opening_plies``, ``moves`` (list of USI), ``plies``, ``result``
        (+1 Black won, -1 White won, 0 draw), ``winner`` (``"black"|"white"|None``), ``reason``
        (one of :data:`REASONS`), ``detail`` (text, e.g. the illegal move or the engine error).
    """
    if start_sfen != STARTPOS:
        from keisei_stream.play.usi import check_sfen

        start_sfen = check_sfen(start_sfen)  # cshogi aborts on some malformed SFENs
    board = cshogi.Board() if start_sfen == STARTPOS else cshogi.Board(start_sfen)
    counts: dict[int, int] = {board.zobrist_hash(): 1}
    moves: list[str] = []
    for mv in opening:
        m = board.move_from_usi(mv)
        if not board.is_legal(m):
            raise ValueError(f"opening move {mv!r} is not legal")
        board.push(m)
        moves.append(mv)
        k = board.zobrist_hash()
        counts[k] = counts.get(k, 0) + 1
    players = (black, white)
    winner: Optional[int] = None
    reason, detail = "", ""
    for color, (p, s) in enumerate(zip(players, seeds)):
        try:
            p.new_game(start_sfen, list(opening), s)
        except PlayerError as exc:  # an engine that cannot start (or hangs at start) loses
            if not reason:
                winner, reason, detail = _opp(color), exc.reason if exc.reason in REASONS else "crash", exc.message
    while not reason:
        side = board.turn
        if board.is_game_over():  # no legal move (only reachable from a mated start position)
            winner, reason = _opp(side), "checkmate"
            break
        if board.is_nyugyoku():
            winner, reason = side, "entering_king"
            break
        if len(moves) >= max_plies:
            reason = "max_plies"
            break
        player = players[side]
        try:
            choice = player.choose(board, len(moves))
        except PlayerError as exc:
            winner, reason, detail = _opp(side), exc.reason if exc.reason in REASONS else "crash", exc.message
            break
        if isinstance(choice, str):
            if choice == "resign":
                winner, reason = _opp(side), "resign"
                break
            if choice == "win":
                if board.is_nyugyoku():
                    winner, reason = side, "entering_king"
                else:
                    winner, reason, detail = _opp(side), "illegal", "entering-king declaration not valid"
                break
            try:
                m = board.move_from_usi(choice)
            except Exception:
                m = 0
            usi = choice
        else:
            m = int(choice)
            usi = cshogi.move_to_usi(m) if m else str(choice)
        if not m or not board.is_legal(m):
            winner, reason, detail = _opp(side), "illegal", f"illegal move {usi!r}"
            break
        board.push(m)
        moves.append(cshogi.move_to_usi(m))
        k = board.zobrist_hash()
        counts[k] = counts.get(k, 0) + 1
        if board.is_game_over():
            winner, reason = side, "checkmate"
            break
        if counts[k] >= 4:
            d = board.is_draw()
            if d == cshogi.REPETITION_WIN:  # the side to move was checked perpetually
                winner, reason = board.turn, "perpetual_check"
            elif d == cshogi.REPETITION_LOSE:
                winner, reason = _opp(board.turn), "perpetual_check"
            else:
                reason = "repetition"
            break
    result = 0 if winner is None else (1 if winner == cshogi.BLACK else -1)
    for color, p in enumerate(players):
        go = getattr(p, "game_over", None)
        if go is not None:
            go("draw" if winner is None else ("win" if winner == color else "lose"))
    return {
        "start_sfen": start_sfen, "opening_plies": len(opening), "moves": moves, "plies": len(moves),
        "result": result, "winner": None if winner is None else ("black" if winner == cshogi.BLACK else "white"),
        "reason": reason, "detail": detail,
    }


# ------------------------------------------------------------------------------------------------
# a match


@dataclass
class MatchResult:
    """Result of :func:`play_match`, from player A's point of view.

    ``elo``/``elo_lo``/``elo_hi``: Elo of A minus B with its 95 % interval (:mod:`keisei_stream.play.elo`;
    bounds may be +-inf at a 0 %/100 % score); ``elo_ci95``: half the interval width ("+-");
    ``los`` in [0, 1]; ``reasons``: count of each end reason; ``records``: one dict per game
    (:func:`play_game`'s fields plus ``game``, ``a_color``, ``black``, ``white``, ``a_result``
    in {+1, 0, -1}); ``seconds``: wall time.
    """

    player_a: str
    player_b: str
    name_a: str
    name_b: str
    games: int
    wins: int
    losses: int
    draws: int
    score: float
    elo: float
    elo_lo: float
    elo_hi: float
    elo_ci95: float
    los: float
    bounded: bool
    reasons: dict
    opening_plies: int
    max_plies: int
    seed: int
    seconds: float
    records: list = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``A vs B: W-L-D (score ..%), Elo +x [lo, hi] (+-m), LOS ..%, reasons``."""
        e = elo_math.estimate(self.wins, self.losses, self.draws)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        return elo_math.format_summary(self.name_a, self.name_b, e) + f"; {reasons}; {self.seconds:.1f} s"

    def to_dict(self, with_records: bool = True) -> dict:
        """JSON-safe dict (infinite values as ``None``)."""
        d = asdict(self)
        if not with_records:
            d.pop("records")
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


# worker-process state: players built once per process from the spec strings
_WORKER: dict = {}


def _close_worker_players() -> None:
    _WORKER.pop("key", None)
    for p in _WORKER.pop("players", ()):
        try:
            p.close()
        except Exception:
            pass


def _worker_players(spec_a: str, spec_b: str, seed: int, temperature: float, device: str) -> tuple:
    key = (spec_a, spec_b, seed, temperature, device)
    if _WORKER.get("key") != key:
        _close_worker_players()
        pa = make_player(spec_a, seed=seed, temperature=temperature, device=device)
        pb = make_player(spec_b, seed=seed + 1, temperature=temperature, device=device)
        _WORKER["players"] = (pa, pb)
        _WORKER["key"] = key
        if mp.parent_process() is not None:
            from multiprocessing import util

            util.Finalize(None, _close_worker_players, exitpriority=10)
    return _WORKER["players"]


def _play_indexed(task: tuple) -> dict:
    """Play game ``i`` of a match (runs in a worker process, or in-process)."""
    (i, spec_a, spec_b, seed, temperature, device, opening_plies, max_plies) = task
    pa, pb = _worker_players(spec_a, spec_b, seed, temperature, device)
    opening = random_opening(opening_plies, _seed_of(seed, i // 2, 17)) if opening_plies > 0 else []
    a_black = i % 2 == 0
    black, white = (pa, pb) if a_black else (pb, pa)
    seeds = (_seed_of(seed, i, 1), _seed_of(seed, i, 2))
    rec = play_game(black, white, max_plies=max_plies, opening=opening, seeds=seeds)
    a_sign = 1 if a_black else -1
    rec.update(game=i, a_color="black" if a_black else "white", black=black.name, white=white.name,
               a_result=rec["result"] * a_sign)
    return rec


def play_match(player_a: str, player_b: str, games: int = 100, opening_plies: int = 0, processes: int = 1,
               max_plies: int = 256, seed: int = 0, *, temperature: float = 0.0, device: str = "cpu",
               progress: bool = True, start_method: str = "spawn", on_game=None) -> MatchResult:
    """Play ``games`` games between two player specs and score them for player A.

    Args:
        player_a, player_b: spec strings (:mod:`keisei_stream.play.players`).
        games: number of games (>= 1); colours alternate, A is Black in even games.
        opening_plies: random plies before the players move (same opening for both games of a pair).
        processes: worker processes (1 = play in this process).
        max_plies: draw after this many plies.
        seed: base seed (openings, random players, sampling).
        temperature, device: defaults for model players.
        progress: show a rich progress bar (on stderr).
        start_method: multiprocessing start method (``spawn`` is safe with CUDA and threads).
        on_game: optional callback ``f(record)`` called in this process after each game.

    Returns:
        :class:`MatchResult`.

    Raises:
        SpecError: a bad spec (raised before any game when the spec does not parse; a model that
            fails to load raises from the first game).
        ValueError: ``games < 1`` or ``processes < 1``.
    """
    from keisei_stream.play.players import parse_spec

    if games < 1 or processes < 1 or max_plies < 1 or opening_plies < 0:
        raise ValueError("games, processes, max_plies must be >= 1 and opening_plies >= 0")
    parse_spec(player_a)
    parse_spec(player_b)
    tasks = [(i, player_a, player_b, seed, temperature, device, opening_plies, max_plies) for i in range(games)]
    records: list[dict] = []
    t0 = time.monotonic()
    w = l = d = 0

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("W {task.fields[w]} L {task.fields[l]} D {task.fields[d]}"),
                   TimeElapsedColumn(), console=console, disable=not progress, transient=False)

    def consume(results) -> None:
        nonlocal w, l, d
        with bar:
            tid = bar.add_task(f"{player_a[:30]} vs {player_b[:30]}", total=games, w=0, l=0, d=0)
            for rec in results:
                records.append(rec)
                w += rec["a_result"] > 0
                l += rec["a_result"] < 0
                d += rec["a_result"] == 0
                bar.update(tid, advance=1, w=w, l=l, d=d)
                if on_game is not None:
                    on_game(rec)

    if processes == 1:
        try:
            consume(_play_indexed(t) for t in tasks)
        finally:
            _close_worker_players()
    else:
        ctx = mp.get_context(start_method)
        with ctx.Pool(min(processes, games)) as pool:
            consume(pool.imap_unordered(_play_indexed, tasks, chunksize=1))
            pool.close()
            pool.join()
    records.sort(key=lambda r: r["game"])
    e = elo_math.estimate(w, l, d)
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    first = records[0]
    name_a = first["black"] if first["a_color"] == "black" else first["white"]
    name_b = first["white"] if first["a_color"] == "black" else first["black"]
    return MatchResult(
        player_a=player_a, player_b=player_b, name_a=name_a, name_b=name_b, games=games, wins=w,
        losses=l, draws=d, score=e.score, elo=e.elo, elo_lo=e.elo_lo, elo_hi=e.elo_hi,
        elo_ci95=e.elo_margin, los=e.los, bounded=e.bounded, reasons=reasons,
        opening_plies=opening_plies, max_plies=max_plies, seed=seed, seconds=time.monotonic() - t0,
        records=records,
    )


# ------------------------------------------------------------------------------------------------
# continuous evaluation and the Elo table


def elo_key(run: str) -> str:
    """``keisei:{run}:elo``: the hash holding the Elo-over-versions table (module docstring)."""
    from keisei_stream.wire.keys import Keys

    return Keys(run).prefix + "elo"


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.3f}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isinf(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


def _num(x: Any, default: float) -> float:
    return default if x is None else float(x)


def get_anchor(r, run: str, opponent: str, *, games: int, processes: int, opening_plies: int,
               max_plies: int, seed: int, progress: bool) -> dict:
    """Rating of an opponent spec on the random = 0 scale: 0 for ``random``; else cached in the
    Elo hash (``anchor:{spec}``) or measured now by a match against ``random``.

    Returns:
        ``{"elo": float, "elo_lo": float, "elo_hi": float, "games": int}`` (bounds may be +-inf).
    """
    if opponent.strip() == "random":
        return {"elo": 0.0, "elo_lo": 0.0, "elo_hi": 0.0, "games": 0}
    field_ = "anchor:" + opponent
    cached = r.hget(elo_key(run), field_)
    if cached:
        a = json.loads(cached)
        return {"elo": a["elo"], "elo_lo": _num(a.get("elo_lo"), -math.inf),
                "elo_hi": _num(a.get("elo_hi"), math.inf), "games": a.get("games", 0)}
    res = play_match(opponent, "random", games, opening_plies, processes, max_plies, seed, progress=progress)
    a = {"elo": res.elo, "elo_lo": res.elo_lo, "elo_hi": res.elo_hi, "games": res.games,
         "wins": res.wins, "losses": res.losses, "draws": res.draws, "time": time.time()}
    r.hset(elo_key(run), field_, json.dumps(_jsonable(a)))
    return a


def evaluate_version(r, url: str, run: str, version: int, sha256: str, cfg, *, games: int, opponents: Sequence[str],
                     processes: int, opening_plies: int, temperature: float, device: str, seed: int = 0,
                     progress: bool = True, console=None) -> dict:
    """Evaluate one weights version (pinned by ``sha256``) against each opponent, append to the
    ``eval`` stream and update the Elo hash. Returns the version's rating dict (``v:{version}``)."""
    from keisei_stream.wire import status
    from keisei_stream.wire.keys import Keys

    keys = Keys(run)
    spec = f"redis:{url}#{run}@sha256:{sha256};name={run}@v{version}"
    matches = {}
    estimates = []
    for opp in opponents:
        anchor = get_anchor(r, run, opp, games=games, processes=processes, opening_plies=opening_plies,
                            max_plies=cfg.env.max_plies, seed=seed + 1, progress=progress)
        res = play_match(spec, opp, games, opening_plies, processes, cfg.env.max_plies, seed + version,
                         temperature=temperature, device=device, progress=progress)
        rating = (anchor["elo"] + res.elo, anchor["elo"] + res.elo_lo, anchor["elo"] + res.elo_hi)
        estimates.append(rating)
        fields = {"version": version, "opponent": opp, "games": res.games, "wins": res.wins,
                  "losses": res.losses, "draws": res.draws, "score": f"{res.score:.4f}",
                  "elo": _fmt(res.elo), "elo_lo": _fmt(res.elo_lo), "elo_hi": _fmt(res.elo_hi),
                  "los": f"{res.los:.4f}", "rating": _fmt(rating[0]), "rating_lo": _fmt(rating[1]),
                  "rating_hi": _fmt(rating[2]), "time": f"{time.time():.3f}"}
        status.append_eval(r, keys, fields, cfg.stream.eval_maxlen)
        matches[opp] = {"wins": res.wins, "losses": res.losses, "draws": res.draws, "score": res.score,
                        "elo": res.elo, "elo_lo": res.elo_lo, "elo_hi": res.elo_hi, "anchor": anchor["elo"]}
        if console is not None:
            console.print(f"v{version}: " + res.summary(), highlight=False)
    m, lo, hi = elo_math.combine(estimates)
    rating = {"version": version, "elo": m, "elo_lo": lo, "elo_hi": hi, "games": games * len(opponents),
              "matches": matches, "time": time.time()}
    text = json.dumps(_jsonable(rating))
    r.hset(elo_key(run), mapping={f"v:{version:08d}": text, "latest": text, "last_version": version})
    return rating


def latest_rating(r, run: str) -> Optional[dict]:
    """The newest evaluated version's rating for ``keisei status``, or None.

    Returns:
        flat dict ``{"version", "elo", "95% interval", "vs", "age_s"}`` (Elo on the random = 0 scale).
    """
    raw = r.hget(elo_key(run), "latest")
    if not raw:
        return None
    d = json.loads(raw)
    vs = ", ".join(f"{k} {100 * v['score']:.0f}%" for k, v in d.get("matches", {}).items())
    return {"version": d["version"], "elo": round(d["elo"], 1),
            "95% interval": f"[{d['elo_lo']:.0f}, {d['elo_hi']:.0f}]" if d.get("elo_lo") is not None else "-",
            "vs": vs, "age_s": round(time.time() - d.get("time", time.time()), 0)}


def elo_table(r, run: str) -> list[dict]:
    """Every evaluated version's rating (``v:*`` fields of the Elo hash), sorted by version."""
    out = []
    for k, v in (r.hgetall(elo_key(run)) or {}).items():
        k = k.decode() if isinstance(k, bytes) else k
        if k.startswith("v:"):
            out.append(json.loads(v))
    return sorted(out, key=lambda d: d["version"])


def _render_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="Elo over versions (random = 0)", title_justify="left")
    for c in ("version", "elo", "95% interval", "matches"):
        t.add_column(c, justify="right" if c != "matches" else "left")
    for d in rows:
        ms = ", ".join(f"{k}: {v['wins']}-{v['losses']}-{v['draws']}" for k, v in d.get("matches", {}).items())
        lo, hi = d.get("elo_lo"), d.get("elo_hi")
        t.add_row(str(d["version"]), f"{d['elo']:.1f}",
                  f"[{lo:.0f}, {hi:.0f}]" if lo is not None and hi is not None else "-", ms)
    return t


def follow(url: str, run: str, *, every: Optional[int] = None, games: Optional[int] = None,
           opponents: Optional[Sequence[str]] = None, processes: Optional[int] = None,
           opening_plies: Optional[int] = None, temperature: Optional[float] = None, device: str = "cpu",
           poll_s: float = 5.0, max_evals: Optional[int] = None, seed: int = 0, progress: bool = True,
           stop_on_control: bool = True) -> int:
    """Watch a run's weights and evaluate every K-th version (module docstring).

    Settings default to the run's config (``eval.*``) read from Redis; the explicit arguments win.
    Stops after ``max_evals`` evaluations, on Ctrl-C, or when the run's ``control`` key is
    ``stop`` (``stop_on_control``). Returns the number of versions evaluated.
    """
    from rich.console import Console

    from keisei_stream.config import config_from_json
    from keisei_stream.wire.keys import Keys
    from keisei_stream.play.players import _connect

    console = Console(stderr=True)
    r = _connect(url)
    keys = Keys(run)
    cfg_text = None
    while cfg_text is None:
        cfg_text = r.get(keys.config)
        if cfg_text is None:
            console.print(f"waiting for the config of run {run} ({keys.config})")
            time.sleep(poll_s)
    cfg = config_from_json(cfg_text)
    every = every or cfg.eval.every_versions
    games = games or cfg.eval.games
    opponents = list(opponents or cfg.eval.opponents)
    processes = processes or cfg.eval.processes
    opening_plies = cfg.eval.opening_plies if opening_plies is None else opening_plies
    temperature = cfg.eval.temperature if temperature is None else temperature
    last = int(r.hget(elo_key(run), "last_version") or 0)
    console.print(f"following run {run}: every {every} versions, {games} games vs {opponents}, "
                  f"last evaluated version {last}")
    done = 0
    try:
        while max_evals is None or done < max_evals:
            h = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in (r.hgetall(keys.weights_latest) or {}).items()}
            if h:
                v = int(h["version"])
                if v > last and v // every > last // every:
                    try:
                        evaluate_version(r, url, run, v, h["sha256"], cfg, games=games, opponents=opponents,
                                         processes=processes, opening_plies=opening_plies,
                                         temperature=temperature, device=device, seed=seed,
                                         progress=progress, console=console)
                    except SpecError as exc:  # e.g. the blob was pruned before it was loaded
                        console.print(f"[yellow]version {v} skipped: {exc}[/yellow]")
                        last = v
                        continue
                    last = v
                    done += 1
                    console.print(_render_table(elo_table(r, run)))
                    continue
            if stop_on_control:
                c = r.get(keys.control)
                if c is not None and (c.decode() if isinstance(c, bytes) else c) == "stop":
                    break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    return done


# ------------------------------------------------------------------------------------------------
# CLI


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``keisei eval`` (a match, or ``--follow`` a run)."""
    p.add_argument("--checkpoint", default=None, help="player A is this checkpoint (same as --player checkpoint:FILE)")
    p.add_argument("--player", default=None, help="player A spec: random | greedy | checkpoint:PATH | "
                   "redis:URL#RUN@VERSION|latest | usi:CMD;go=...;option.K=V;timeout=S")
    p.add_argument("--opponent", default="random", help="player B spec (default: random)")
    p.add_argument("--games", type=int, default=None, help="games (default 100; --follow: config eval.games)")
    p.add_argument("--opening-plies", type=int, default=None, help="random opening plies (same for both colours)")
    p.add_argument("--processes", type=int, default=None, help="worker processes (default 1)")
    p.add_argument("--max-plies", type=int, default=None,
                   help="draw after this many plies (default: the checkpoint's env.max_plies, else 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="model players: 0 = argmax (default)")
    p.add_argument("--device", default="cpu", help="model players: cpu | cuda | auto")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result (with every game) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--follow", action="store_true", help="continuously evaluate a run's weights versions")
    p.add_argument("--table", action="store_true", help="print the run's Elo-over-versions table and exit")
    p.add_argument("--run", default="quickstart", help="run id (--follow / --table)")
    p.add_argument("--redis", default=None, help="Redis URL (--follow / --table; default: the local run's)")
    p.add_argument("--runs-dir", default="runs", help="where a local `keisei run` records its Redis URL")
    p.add_argument("--every", type=int, default=None, help="--follow: every K-th version (default config)")
    p.add_argument("--opponents", nargs="+", default=None, help="--follow: opponent specs (default config)")
    p.add_argument("--poll-s", type=float, default=5.0, help="--follow: seconds between polls")
    p.add_argument("--max-evals", type=int, default=None, help="--follow: stop after this many evaluations")


def _resolve_url(args) -> str:
    if args.redis:
        return args.redis
    f = Path(args.runs_dir) / args.run / "redis.url"
    if f.exists():
        return f.read_text().strip()
    raise SystemExit(f"error: no --redis given and no local run found at {f}")


def cli_eval(args) -> int:
    """``keisei eval``: returns the process exit code (0 ok, 2 bad arguments)."""
    from rich.console import Console

    console = Console(stderr=True)
    if args.table or args.follow:
        url = _resolve_url(args)
        if args.table:
            from keisei_stream.play.players import _connect

            Console().print(_render_table(elo_table(_connect(url), args.run)))
            return 0
        n = follow(url, args.run, every=args.every, games=args.games, opponents=args.opponents,
                   processes=args.processes, opening_plies=args.opening_plies, temperature=args.temperature,
                   device=args.device, poll_s=args.poll_s, max_evals=args.max_evals, seed=args.seed,
                   progress=not args.no_progress)
        console.print(f"evaluated {n} version(s)")
        return 0
    if args.checkpoint and args.player:
        console.print("[red]error:[/red] give --checkpoint or --player, not both")
        return 2
    player = args.player or (f"checkpoint:{args.checkpoint}" if args.checkpoint else None)
    if player is None:
        console.print("[red]error:[/red] --checkpoint FILE or --player SPEC is required")
        return 2
    max_plies = args.max_plies
    if max_plies is None:
        max_plies = 256
        if args.checkpoint:
            try:
                from keisei_stream.rl.checkpoint import read_checkpoint
                from keisei_stream.config import config_from_json

                max_plies = config_from_json(read_checkpoint(args.checkpoint)["config_json"]).env.max_plies
            except Exception:  # unreadable here: play_match reports the checkpoint's error itself
                pass
    try:
        res = play_match(player, args.opponent, args.games or 100, args.opening_plies or 0, args.processes or 1,
                         max_plies, args.seed, temperature=args.temperature or 0.0, device=args.device,
                         progress=not args.no_progress)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=1))
    print(res.summary(), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m keisei_stream.play.evaluation ...`` (same arguments as ``keisei eval``)."""
    p = argparse.ArgumentParser(prog="keisei eval", description="play a match and report score and Elo")
    add_eval_arguments(p)
    return cli_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
