"""Continuous evaluation of a run and its Elo table in Redis.

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

**Saved files** (:class:`EvalFiles`; ``follow(..., runs_dir=...)``, which ``keisei eval --follow``
passes as ``--runs-dir``): the ``eval`` stream and the Elo hash live in the run's Redis, which a
local run stops at its end, so the follower also keeps them in the run directory
``{runs_dir}/{run}/``:

- ``eval/eval.jsonl``: one JSON line per ``eval`` stream entry (appended after the ``XADD``):
  ``id`` (the stream entry id), ``run``, ``sha256`` and the entry's fields as numbers
  (``version, games, wins, losses, draws`` int; ``score, elo, elo_lo, elo_hi, los, rating,
  rating_lo, rating_hi, time`` float, an infinite bound written as null: ``*_lo`` null is
  -inf, ``*_hi`` null is +inf);
- ``eval/elo_table.json``: ``{"run", "updated", "last_version", "anchors": {spec: anchor},
  "versions": [rating, ...]}`` (the Elo hash's content, versions sorted), rewritten atomically
  after each evaluated version; versions already in the file and no longer in Redis (a resumed
  run with a fresh Redis) are kept; :func:`saved_elo_table` reads it;
- ``tensorboard/``: scalars ``elo/{opponent}`` (the version's rating from that match, random = 0),
  ``score/{opponent}`` and ``elo/combined`` at step = version, next to the learner's event files
  (optional dependency: skipped with a warning when TensorBoard is not installed).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.table import Table

from keisei_stream.config import Config, config_from_json
from keisei_stream.play.evaluation import elo as elo_math
from keisei_stream.play.evaluation.match import play_match
from keisei_stream.play.players import SpecError
from keisei_stream.wire import client, status, weights
from keisei_stream.wire.keys import Keys


def elo_key(run: str) -> str:
    """``keisei:{run}:elo``: the hash holding the Elo-over-versions table (module docstring)."""
    return Keys(run).elo


#: files the follower keeps in ``{runs_dir}/{run}/eval`` (module docstring)
EVAL_LOG = "eval.jsonl"
ELO_TABLE = "elo_table.json"


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
    Elo hash (``anchor:{spec}``) or measured now by a match of ``games`` games against ``random``
    (arguments as :func:`keisei_stream.play.evaluation.match.play_match`) and cached.

    Returns:
        ``{"elo": float, "elo_lo": float, "elo_hi": float, "games": int}`` (bounds may be +-inf;
        a freshly measured anchor also has ``wins``, ``losses``, ``draws``, ``time``).

    Raises:
        SpecError: a bad opponent spec.
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


def evaluate_version(r, url: str, run: str, version: int, sha256: str, cfg: Config, *, games: int,
                     opponents: Sequence[str], processes: int, opening_plies: int, temperature: float, device: str,
                     seed: int = 0, progress: bool = True, console: Optional[Console] = None,
                     files: Optional["EvalFiles"] = None) -> dict:
    """Evaluate one weights version (pinned by ``sha256``) against each opponent, append to the
    ``eval`` stream and update the Elo hash (module docstring).

    Args:
        r: Redis client; url, run: where the weights are (the model players load them from ``url``).
        version, sha256: the weights version and its blob's SHA-256 (hex).
        cfg: the run's config (``env.max_plies``, ``stream.eval_maxlen``).
        games, opponents, processes, opening_plies, temperature, device, seed, progress: the
            matches' settings (:func:`keisei_stream.play.evaluation.match.play_match`); the match against
            an opponent uses ``seed + version``, its anchor match ``seed + 1``.
        console: where each match's summary line is printed (None: nowhere).
        files: where each entry and the Elo table are also saved (None: Redis only).

    Returns:
        the version's rating, as stored under ``v:{version:08d}``: ``version``, ``elo``,
        ``elo_lo``, ``elo_hi`` (float, bounds may be +-inf; JSON null in Redis), ``games``,
        ``matches`` (per opponent: wins, losses, draws, score, elo, elo_lo, elo_hi, anchor),
        ``time`` (Unix seconds).

    Raises:
        SpecError: a bad opponent spec, or weights that cannot be loaded (e.g. already pruned).
    """
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
        entry_id = status.append_eval(r, keys, fields, cfg.stream.eval_maxlen)
        if files is not None:
            files.add_entry(entry_id, sha256, fields)
        matches[opp] = {"wins": res.wins, "losses": res.losses, "draws": res.draws, "score": res.score,
                        "elo": res.elo, "elo_lo": res.elo_lo, "elo_hi": res.elo_hi, "anchor": anchor["elo"]}
        if console is not None:
            console.print(f"v{version}: " + res.summary(), highlight=False)
    m, lo, hi = elo_math.combine(estimates)
    rating = {"version": version, "elo": m, "elo_lo": lo, "elo_hi": hi, "games": games * len(opponents),
              "matches": matches, "time": time.time()}
    text = json.dumps(_jsonable(rating))
    r.hset(elo_key(run), mapping={f"v:{version:08d}": text, "latest": text, "last_version": version})
    if files is not None:
        files.save_table(r, rating)
    return rating


def latest_rating(r, run: str) -> Optional[dict]:
    """The newest evaluated version's rating for ``keisei status``, or None.

    Returns:
        flat dict ``{"version", "elo", "95% interval", "vs", "age_s"}`` (Elo on the random = 0 scale,
        rounded to 0.1; the interval as text; ``vs``: score per opponent in %; ``age_s``: seconds
        since the evaluation).

    Raises:
        ValueError, KeyError, TypeError: a malformed ``latest`` entry.
    """
    raw = r.hget(elo_key(run), "latest")
    if not raw:
        return None
    return rating_summary(json.loads(raw))


def rating_summary(d: dict) -> dict:
    """:func:`latest_rating`'s flat dict of one version's rating (as stored under ``v:*``).

    Raises:
        KeyError, TypeError, ValueError: not such a rating.
    """
    vs = ", ".join(f"{k} {100 * v['score']:.0f}%" for k, v in d.get("matches", {}).items())
    return {"version": d["version"], "elo": round(d["elo"], 1),
            "95% interval": f"[{d['elo_lo']:.0f}, {d['elo_hi']:.0f}]" if d.get("elo_lo") is not None else "-",
            "vs": vs, "age_s": round(time.time() - d.get("time", time.time()), 0)}


def elo_table(r, run: str) -> list[dict]:
    """Every evaluated version's rating (``v:*`` fields of the Elo hash, as
    :func:`evaluate_version` returns them but with null for infinite bounds), sorted by version."""
    out = []
    for k, v in (r.hgetall(elo_key(run)) or {}).items():
        k = k.decode() if isinstance(k, bytes) else k
        if k.startswith("v:"):
            out.append(json.loads(v))
    return sorted(out, key=lambda d: d["version"])


class EvalFiles:
    """The follower's saved files in a run directory (module docstring): ``eval/eval.jsonl``,
    ``eval/elo_table.json`` and TensorBoard scalars in ``tensorboard/``.

    Args:
        run_dir: ``{runs_dir}/{run}``. run: the run id.
        tensorboard: write TensorBoard scalars (when the package is installed).
        console: where a missing TensorBoard is reported (once).
    """

    def __init__(self, run_dir: str | Path, run: str, tensorboard: bool = True, console: Optional[Console] = None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "eval"
        self.run = run
        self.console = console
        self._tb_wanted = tensorboard
        self._tb = None

    def _writer(self):
        if not self._tb_wanted:
            return None
        if self._tb is None:
            try:  # optional dependency (extra "tensorboard"); imported only when a scalar is written
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb_wanted = False
                if self.console is not None:
                    self.console.print("[yellow]tensorboard is not installed: no Elo curve in TensorBoard "
                                       "(pip install tensorboard); eval.jsonl and elo_table.json are still written[/yellow]")
                return None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), filename_suffix=".eval")
        return self._tb

    def add_entry(self, entry_id: Any, sha256: str, fields: dict) -> dict:
        """Append one ``eval`` stream entry (its ``fields`` as written) to ``eval.jsonl`` and its
        scalars to TensorBoard; returns the line's data."""
        ints = ("version", "games", "wins", "losses", "draws")
        line: dict[str, Any] = {"id": client.as_str(entry_id), "run": self.run, "sha256": sha256}
        for k, v in fields.items():
            if k in ints:
                line[k] = int(v)
            elif k == "opponent":
                line[k] = str(v)
            else:
                x = float(v)
                line[k] = None if math.isinf(x) else x
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / EVAL_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        tb = self._writer()
        if tb is not None:
            tag = _tag(line["opponent"])
            if line.get("rating") is not None:
                tb.add_scalar(f"elo/{tag}", line["rating"], line["version"])
            tb.add_scalar(f"score/{tag}", line["score"], line["version"])
            tb.flush()
        return line

    def save_table(self, r, rating: Optional[dict] = None) -> dict:
        """Rewrite ``elo_table.json`` from the Elo hash (merged with the versions the file already
        has) and add ``rating`` (the version just evaluated) as ``elo/combined`` to TensorBoard.
        Returns the file's data."""
        anchors, versions = {}, {}
        old = load_saved(self.dir)
        if old:
            anchors.update(old.get("anchors", {}))
            versions.update({int(v["version"]): v for v in old.get("versions", [])})
        for k, v in (r.hgetall(elo_key(self.run)) or {}).items():
            k = client.as_str(k)
            if k.startswith("anchor:"):
                anchors[k[len("anchor:"):]] = json.loads(v)
            elif k.startswith("v:"):
                d = json.loads(v)
                versions[int(d["version"])] = d
        data = {"run": self.run, "updated": time.time(), "last_version": max(versions, default=0),
                "anchors": anchors, "versions": [versions[k] for k in sorted(versions)]}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (ELO_TABLE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.dir / ELO_TABLE)
        tb = self._writer()
        if tb is not None and rating is not None and rating.get("elo") is not None:
            tb.add_scalar("elo/combined", rating["elo"], rating["version"])
            tb.flush()
        return data

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tag(opponent: str) -> str:
    """A TensorBoard tag part for an opponent spec (``checkpoint:/a/b.pt`` -> ``checkpoint__a_b.pt``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", opponent.strip())[:80] or "opponent"


def load_saved(eval_dir: str | Path) -> Optional[dict]:
    """The content of ``{eval_dir}/elo_table.json`` (:class:`EvalFiles`), None when absent.

    Raises:
        ValueError: not JSON; OSError: unreadable.
    """
    path = Path(eval_dir) / ELO_TABLE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def saved_elo_table(eval_dir: str | Path) -> list[dict]:
    """The saved Elo table's versions (rows as :func:`elo_table` returns them), sorted by version;
    empty when there is no saved table.

    Raises:
        ValueError: not JSON; OSError: unreadable.
    """
    data = load_saved(eval_dir) or {}
    return sorted(data.get("versions", []), key=lambda d: d["version"])


def saved_latest_rating(eval_dir: str | Path) -> Optional[dict]:
    """:func:`latest_rating` from the saved Elo table (its newest version), None when there is none.

    Raises:
        ValueError, KeyError, TypeError, OSError: an unreadable or malformed file.
    """
    rows = saved_elo_table(eval_dir)
    return rating_summary(rows[-1]) if rows else None


def merge_tables(saved: list[dict], live: list[dict]) -> list[dict]:
    """Rows of both tables by version, ``live`` winning, sorted by version."""
    by_version = {int(d["version"]): d for d in saved}
    by_version.update({int(d["version"]): d for d in live})
    return [by_version[k] for k in sorted(by_version)]


def render_elo_table(rows: list[dict]) -> Table:
    """A rich table of :func:`elo_table`'s rows: version, Elo, 95 % interval, W-L-D per opponent."""
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
           stop_on_control: bool = True, runs_dir: Optional[str | Path] = None, tensorboard: bool = True) -> int:
    """Watch a run's weights and evaluate every K-th version (module docstring).

    Settings default to the run's config (``eval.*``) read from Redis, waiting (polling every
    ``poll_s`` seconds) until the run has one; the explicit arguments win. Resumes after the
    Elo hash's ``last_version``. A version whose weights cannot be loaded is skipped with a
    message. Progress goes to stderr. With ``runs_dir``, every entry and the Elo table are also
    saved in ``{runs_dir}/{run}`` (:class:`EvalFiles`; ``tensorboard``: the Elo curve too).

    Returns:
        the number of versions evaluated; it stops after ``max_evals`` evaluations, on Ctrl-C, or
        when the run's ``control`` key is ``stop`` (``stop_on_control``).

    Raises:
        SpecError: a bad opponent spec; redis.RedisError: Redis unreachable.
    """
    console = Console(stderr=True)
    r = client.connect(url)
    keys = Keys(run)
    cfg_text = status.read_config(r, keys)
    while cfg_text is None:
        console.print(f"waiting for the config of run {run} ({keys.config})")
        time.sleep(poll_s)
        cfg_text = status.read_config(r, keys)
    cfg = config_from_json(cfg_text)
    every = every or cfg.eval.every_versions
    games = games or cfg.eval.games
    opponents = list(opponents or cfg.eval.opponents)
    processes = processes or cfg.eval.processes
    opening_plies = cfg.eval.opening_plies if opening_plies is None else opening_plies
    temperature = cfg.eval.temperature if temperature is None else temperature
    last = int(r.hget(elo_key(run), "last_version") or 0)
    files = EvalFiles(Path(runs_dir) / run, run, tensorboard, console) if runs_dir is not None else None
    console.print(f"following run {run}: every {every} versions, {games} games vs {opponents}, "
                  f"last evaluated version {last}"
                  + (f"; saving to {files.dir}" if files is not None else ""), highlight=False)
    done = 0
    try:
        while max_evals is None or done < max_evals:
            if stop_on_control and status.get_control(r, keys) == "stop":
                break  # checked before every evaluation: a stopping run is not evaluated further
            latest = weights.read_latest_info(r, keys)
            if latest is not None:
                v = latest["version"]
                if v > last and v // every > last // every:
                    try:
                        evaluate_version(r, url, run, v, latest["sha256"], cfg, games=games, opponents=opponents,
                                         processes=processes, opening_plies=opening_plies,
                                         temperature=temperature, device=device, seed=seed,
                                         progress=progress, console=console, files=files)
                    except SpecError as exc:  # e.g. the blob was pruned before it was loaded
                        console.print(f"[yellow]version {v} skipped: {exc}[/yellow]")
                    else:
                        done += 1
                        console.print(render_elo_table(elo_table(r, run)))
                    last = v
                    continue
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        if files is not None:
            files.close()
    return done
