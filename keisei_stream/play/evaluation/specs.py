"""Player spec strings: parsing (:func:`parse_spec`) and building players (:func:`make_player`).

Players are built from spec strings, so that worker processes of a match receive text, never
live objects::

    random | greedy
    checkpoint:PATH[;temperature=T][;device=D][;name=N]
    redis:URL#RUN@VERSION|latest|sha256:HEX[;temperature=T][;device=D][;name=N]
    search:PATH[;nodes=N][;batch_size=B][;time_limit=S][;...][;device=D][;name=N]
    redis:URL#RUN@VERSION|latest|sha256:HEX;nodes=N[;batch_size=B][;...]
    usi:COMMAND LINE[;go=go byoyomi 1000][;timeout=S][;option.NAME=VALUE]...[;cwd=DIR][;name=N]

Options are separated by ``;``; the USI command line is split with :func:`shlex.split`.

Model players play the raw policy (one forward pass per move: ``temperature`` 0 = argmax, > 0
samples ``softmax(logits / T)``) unless they search: ``search:PATH`` always does (``nodes``
default 800), and a ``checkpoint:`` or ``redis:`` spec does when it has ``nodes=`` or
``time_limit=``. A searching player is a :class:`keisei_stream.play.engine.search_player.SearchPlayer`
(PUCT tree search, ``nodes`` simulations per move, the tree kept between the moves of a game);
every keyword of :func:`search_player_from_spec` is accepted (``nodes``,
``time_limit``, ``batch_size``, ``c_init``, ``mate_search_plies``, ``temperature`` = sampling in
proportion to ``visits ** (1 / T)``, ...). So one match can compare a version's raw policy
(``redis:URL#RUN@12``) with its searched strength (``redis:URL#RUN@12;nodes=200``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from keisei_stream.play.evaluation.baselines import GreedyPlayer, RandomPlayer
from keisei_stream.play.evaluation.usi_client import UsiEnginePlayer
from keisei_stream.play.players import Player, SpecError

@dataclass
class PlayerSpec:
    """A parsed spec string: ``kind`` in random/greedy/checkpoint/redis/search/usi, ``body`` and options."""

    kind: str
    body: str = ""
    options: dict = field(default_factory=dict)
    text: str = ""


def parse_spec(spec: str) -> PlayerSpec:
    """Parse a player spec string (grammar in the module docstring).

    Returns:
        :class:`PlayerSpec` with the lower-case ``kind``, the ``body`` after ``kind:`` (stripped),
        the ``;key=value`` options and the original ``text``.

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
    elif kind in ("checkpoint", "redis", "search", "usi"):
        if not body.strip():
            raise SpecError(f"player spec {spec!r}: {kind}: needs an argument")
    else:
        raise SpecError(f"unknown player kind {kind!r} in {spec!r} "
                        "(random, greedy, checkpoint:, redis:, search:, usi:)")
    return PlayerSpec(kind, body.strip(), opts, spec)


def parse_redis_body(body: str) -> tuple[str, str, str]:
    """``URL#RUN@VERSION`` -> ``(url, run, version)``; ``@VERSION`` defaults to ``latest``.

    Raises:
        SpecError: without ``#RUN``, or with an empty URL or run.
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

    Returns:
        a :class:`keisei_stream.play.players.Player`; a USI engine is not started here (it starts
        at its first ``new_game``, which raises ``PlayerError`` if it cannot).

    Raises:
        SpecError: bad spec or unloadable model.
    """
    ps = parse_spec(spec)
    o = ps.options
    name = o.get("name")
    if ps.kind == "random":
        return RandomPlayer(seed, name or "random")
    if ps.kind == "greedy":
        return GreedyPlayer(seed, name or "greedy")
    if ps.kind in ("checkpoint", "redis", "search"):
        try:
            temp = float(o.get("temperature", temperature))
        except ValueError:
            raise SpecError(f"bad temperature in {spec!r}") from None
        dev = o.get("device", device)
        searching = ps.kind == "search" or "nodes" in o or "time_limit" in o
        # imported here, not at the top: torch (about 2 s to import) is loaded only when a model
        # player is built, so matches between random, greedy and USI players, and each of their
        # worker processes, start without it
        from keisei_stream.play.engine.model_player import ModelPlayer
        from keisei_stream.play.evaluation.run_weights import load_model_from_redis

        source, default = ps.body, None
        if ps.kind == "redis":
            url, run, version = parse_redis_body(ps.body)
            model, cfg, meta = load_model_from_redis(url, run, version, dev)
            source = (model, cfg, meta)
            default = f"{run}@v{meta['version']}" if meta.get("version") is not None else f"{run}@{meta['sha256'][:12]}"
        if searching:
            return _search_player(spec, source, o, default, seed=seed, temperature=temp, device=dev)
        return ModelPlayer(source, temperature=temp, device=dev, name=name or default, seed=seed)
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


def _search_player(spec: str, source, options: dict, default_name, *, seed: int, temperature: float, device: str):
    """A :class:`keisei_stream.play.engine.search_player.SearchPlayer` for a ``search:`` spec, or a
    model spec with ``nodes=`` / ``time_limit=`` (``source``: a path or a loaded ``(model, config, meta)``)."""
    opts = dict(options)
    opts["temperature"] = str(temperature)
    if "nodes" not in opts and "time_limit" not in opts:
        opts["nodes"] = "800"
    if default_name is not None and "name" not in opts:
        limit = f"search{opts['nodes']}" if "nodes" in opts else f"search{opts['time_limit']}s"
        opts["name"] = f"{default_name}+{limit}"
    try:
        return search_player_from_spec(source, opts, seed=seed, device=device)
    except SpecError:
        raise
    except ValueError as exc:
        raise SpecError(f"player spec {spec!r}: {exc}") from None


_SPEC_INT = ("nodes", "batch_size", "mate_search_plies", "seed", "threads", "draw_plies", "max_plies",
             "max_tree_visits")
_SPEC_FLOAT = ("time_limit", "c_init", "c_base", "c_init_root", "c_base_root", "fpu_reduction",
               "fpu_reduction_root", "virtual_loss", "policy_temperature", "temperature",
               "dirichlet_alpha", "dirichlet_epsilon")
_SPEC_BOOL = ("leaf_mate_in_1", "reuse_tree", "amp")


def search_player_from_spec(body: Union[str, tuple], options: dict, *, seed: int = 0,
                            device: str = "cpu") -> Player:
    """Build a :class:`keisei_stream.play.engine.search_player.SearchPlayer` from a parsed spec
    ``search:PATH;nodes=N;...`` (body = PATH, or a loaded ``(model, config, meta)`` for
    ``redis:...;nodes=N``; options = the ``key=value`` pairs; ``device`` and ``name`` as for
    checkpoint players, every :class:`keisei_stream.play.engine.mcts.MCTS` keyword accepted;
    ``time_limit`` without ``nodes`` searches for that many seconds a move). For :func:`make_player`.

    Raises:
        ValueError: unknown option or unparsable value.
        SpecError: the model cannot be loaded.
    """
    kw: dict = {}
    dev = options.get("device", device)
    name = options.get("name")
    for k, v in options.items():
        if k in ("device", "name"):
            continue
        try:
            if k in _SPEC_INT:
                kw[k] = int(v)
            elif k in _SPEC_FLOAT:
                kw[k] = float(v)
            elif k in _SPEC_BOOL:
                if v.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(v)
                kw[k] = v.lower() in ("1", "true", "yes", "on")
            else:
                raise ValueError(f"unknown search player option {k!r}")
        except ValueError as exc:
            raise ValueError(f"search player option {k}={v!r}: {exc}") from None
    kw.setdefault("seed", seed)
    if "time_limit" in kw and "nodes" not in kw:
        kw["nodes"] = None
    # imported here, not at the top: torch (about 2 s to import) comes with the engine's players
    from keisei_stream.play.engine.search_player import SearchPlayer

    return SearchPlayer(body, device=dev, name=name, **kw)
