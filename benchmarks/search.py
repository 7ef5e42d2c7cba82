"""Tree-search throughput (keisei_stream.play.engine.mcts.MCTS) against the bare forward pass.

For the quickstart net (``configs/quickstart.yaml``'s ``model`` section, random init, seed 0) on
one CPU thread (``torch.set_num_threads(1)``), and on CUDA when available, for each batch size
(default 1, 8, 32):

* ``forward``: positions/s of the bare forward pass ``model(obs)`` of a ``(B, 46, 9, 9)`` batch
  of real observations under ``torch.inference_mode`` (the baseline: an upper bound on the
  search's nodes/s at that batch size);
* ``search``: simulations/s of :meth:`MCTS.search` with ``nodes=N`` from a fresh tree, summed over
  a few positions (the start position and positions after 20, 40, 60 random plies), root mate
  search and leaf mate checks left at their defaults;
* ``search_over_forward``: ``search nodes/s / forward positions/s`` (1.0 = no search overhead);
* ``outside_forward_share``: the share of the search's wall time spent outside its forward passes
  (``1 - forward_seconds / elapsed``, ``forward_seconds`` = model call + copying the legal logits
  and values back), the goal being <= 0.30 at batch 32; ``overhead_us_per_node`` the same time per
  simulation;
* the same two figures from this thread's CPU time (``time.thread_time``), which the other
  processes of a shared machine disturb less than wall time (on CPU only).

Every figure is the median of ``--repeats`` runs (default 3). The ``layout`` section times one
PUCT selection plus the edge updates of one simulation (virtual loss in, backup) for two node
layouts at several widths (edges scanned): ``lists``, the layout used (Python lists sorted by prior,
the prefix scanned in a Python loop) and ``numpy``, one NumPy array per statistic over all edges of
the node with vectorised scoring and NumPy scalar updates.

The ``clock`` section (with ``--clock-checkpoint FILE --clock-games DIR``) is issue 18's
measurement: ``keisei usi --checkpoint FILE`` in a subprocess, driven over pipes by cshogi's USI
client (``cshogi.usi.Engine``, as a GUI would), answers ``go btime 0 wtime 0 byoyomi 300``
(``--clock-byoyomi``) in ``--clock-positions`` (200) positions drawn uniformly (seed 0) from the self-play games of a
run's archive (``runs/{run}/games``, :func:`keisei_stream.play.records.read_archive_games`): every
position before one of a game's moves. Reported: the wall time from writing ``go`` to reading
``bestmove`` (slowest, percentiles, how many over the byoyomi and over the engine's budget, the
byoyomi less the ``ByoyomiMargin`` the engine keeps), the engine's own ``time``, nodes, the answers
given without a search, and as the same-run baseline the round trip of ``isready`` over the same
pipes (what the pipes and the client cost with no search at all).

Prints one JSON object. Usage::

    PYTHONPATH=. python benchmarks/search.py [--nodes 512] [--repeats 3] [--batch-sizes 1,8,32]
    PYTHONPATH=. python benchmarks/search.py --clock-only --clock-checkpoint C.pt --clock-games runs/RUN/games
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cshogi
import numpy as np
import torch

from keisei_stream.config import load_config
from keisei_stream.play.engine.mcts import MCTS
from keisei_stream.play.engine.puct import SearchOptions, select
from keisei_stream.play.engine.tree import Node
from keisei_stream.rl.model import build_model, count_parameters
from keisei_stream.shogi import encode_observation

ROOT = Path(__file__).resolve().parent.parent


def positions(seed: int = 0) -> list[cshogi.Board]:
    """The start position and positions after 20, 40 and 60 uniformly random plies."""
    rng = np.random.default_rng(seed)
    out = [cshogi.Board()]
    for plies in (20, 40, 60):
        while True:
            b = cshogi.Board()
            ok = True
            for _ in range(plies):
                legal = list(b.legal_moves)
                if not legal:
                    ok = False
                    break
                b.push(legal[int(rng.integers(len(legal)))])
            if ok and len(b.legal_moves) and not b.is_nyugyoku():
                out.append(b)
                break
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(model, obs: np.ndarray, batch: int, device: torch.device, min_time: float) -> float:
    """Positions/s of ``model(x)`` on a ``(batch, 46, 9, 9)`` batch already on ``device``."""
    reps = -(-batch // len(obs))
    x = torch.from_numpy(np.concatenate([obs] * reps)[:batch]).to(device)
    with torch.inference_mode():
        model(x)
        _sync(device)
        iters, t0 = 0, time.perf_counter()
        while True:
            model(x)
            iters += 1
            if iters >= 3 and time.perf_counter() - t0 >= min_time:
                break
        _sync(device)
        return batch * iters / (time.perf_counter() - t0)


def search_run(model, boards, batch: int, nodes: int, max_plies: int) -> dict:
    sims = 0
    wall = fwd = cpu = 0.0
    for b in boards:
        s = MCTS(model, max_plies=max_plies, batch_size=batch)
        c0 = time.thread_time()
        r = s.search(b, nodes=nodes)
        cpu += time.thread_time() - c0
        sims += r.nodes
        wall += r.elapsed
        fwd += r.forward_seconds
    return {"sims": sims, "wall": wall, "forward": fwd, "cpu": cpu}


def bench_device(model, cfg, device: torch.device, args) -> dict:
    boards = positions(0)
    obs = np.stack([encode_observation(b, len(b.history), 0, cfg.env.max_plies) for b in boards])
    model = model.to(device).eval()
    # warm-up (allocator, kernels, cuDNN autotune)
    MCTS(model, max_plies=cfg.env.max_plies, batch_size=8).search(boards[0], nodes=64)
    out = {}
    for batch in args.batch_sizes:
        fw, nps, share, over, cpu_nps, cpu_share = [], [], [], [], [], []
        for _ in range(args.repeats):
            fw.append(forward_rate(model, obs, batch, device, args.min_time))
            run = search_run(model, boards, batch, args.nodes, cfg.env.max_plies)
            nps.append(run["sims"] / run["wall"])
            share.append(1.0 - run["forward"] / run["wall"])
            over.append((run["wall"] - run["forward"]) / run["sims"] * 1e6)
            if device.type == "cpu":
                cpu_nps.append(run["sims"] / run["cpu"])
                # forward passes run on this thread on the CPU: its CPU time covers them too
                cpu_share.append(max(0.0, 1.0 - run["forward"] / run["cpu"]))
        med = statistics.median
        row = {
            "forward_positions_per_s": round(med(fw), 1),
            "search_nodes_per_s": round(med(nps), 1),
            "search_over_forward": round(med(nps) / med(fw), 3),
            "outside_forward_share": round(med(share), 3),
            "overhead_us_per_node": round(med(over), 1),
            "runs": {"forward": [round(v, 1) for v in fw], "search": [round(v, 1) for v in nps],
                     "outside_forward_share": [round(v, 3) for v in share]},
        }
        if cpu_nps:
            row["search_nodes_per_cpu_s"] = round(med(cpu_nps), 1)
        out[str(batch)] = row
    return out


# ------------------------------------------------------------------------------------------------
# node layout micro-benchmark


def _numpy_select(prior, n, w, n_sum, w_sum, visited_p, c_init=2.88, c_base=28288.0, red=0.54):
    """PUCT over all edges with per-node NumPy arrays (the alternative layout)."""
    c = c_init + math.log((n_sum + c_base + 1.0) / c_base)
    fpu = max(-1.0, w_sum / n_sum - red * math.sqrt(visited_p))
    q = np.full(n.shape, fpu)
    np.divide(w, n, out=q, where=n > 0.0)
    score = prior * (c * math.sqrt(n_sum))
    score /= n + 1.0
    score += q
    return int(score.argmax())


def layout(widths=(4, 8, 16, 24, 32, 48, 80), edges: int = 80, iters: int = 4000) -> dict:
    """Microseconds per (select + virtual-loss update + backup) of one node, per layout."""
    rng = np.random.default_rng(0)
    prior = np.sort(rng.dirichlet(np.full(edges, 0.3)))[::-1].copy()
    options = SearchOptions()
    res = {}
    for width in widths:
        visited = max(0, min(width - 1, edges))
        n = np.zeros(edges)
        n[:visited] = rng.integers(1, 30, visited)
        w = n * rng.uniform(-0.5, 0.5, edges)
        node = Node(0)
        node.moves = list(range(edges))
        node.prior = prior.tolist()
        node.n = n.tolist()
        node.w = w.tolist()
        node.n_sum, node.w_sum = float(n.sum()), float(w.sum())
        node.visited_p = float(prior[:visited].sum())
        node.width = min(edges, width)
        t0 = time.perf_counter()
        for _ in range(iters):
            i = select(node, False, options)
            node.n[i] += 1.0
            node.w[i] -= 1.0
            node.n_sum += 1.0
            node.w_sum -= 1.0
            node.n[i] += 0.0
            node.w[i] += 1.0 + 0.1
            node.n_sum += 0.0
            node.w_sum += 1.1
        t_list = (time.perf_counter() - t0) / iters * 1e6
        pn, nn, wn = prior.astype(np.float32), n.copy(), w.copy()
        s = [float(nn.sum()), float(wn.sum())]
        t0 = time.perf_counter()
        for _ in range(iters):
            i = _numpy_select(pn, nn, wn, s[0], s[1], 0.5)
            nn[i] += 1.0
            wn[i] -= 1.0
            s[0] += 1.0
            s[1] -= 1.0
            nn[i] += 0.0
            wn[i] += 1.1
            s[1] += 1.1
        t_np = (time.perf_counter() - t0) / iters * 1e6
        res[str(width)] = {"lists_us": round(t_list, 2), "numpy_us": round(t_np, 2)}
    return {"edges": edges, "us_per_select_and_update": res}


def _engine_script(directory: Path, checkpoint: str) -> Path:
    """A one-line executable that starts ``keisei usi`` (cshogi's client runs one program path)."""
    script = directory / "keisei_engine.sh"
    args = " ".join([sys.executable, "-m", "keisei_stream.cli", "usi", "--checkpoint", checkpoint])
    script.write_text(f"#!/bin/sh\nexec {args}\n")
    script.chmod(0o755)
    return script


def _clock_positions(games_dir: str, count: int, seed: int) -> tuple[list[tuple[str, list[str], cshogi.Board]], int, int]:
    """``count`` positions ``("startpos" or "sfen SFEN", moves, board after them)`` drawn uniformly
    without replacement among the positions of the archive's games before each of their moves,
    with the numbers of games and of such positions."""
    from keisei_stream.play.records import board_after, read_archive_games
    from keisei_stream.shogi import STARTING_SFEN

    games = read_archive_games(games_dir)
    pairs = [(g, ply) for g in games for ply in range(g.plies)]
    if not pairs:
        raise SystemExit(f"no games in {games_dir}")
    picks = np.random.default_rng(seed).choice(len(pairs), size=min(count, len(pairs)), replace=False)
    out = []
    for i in sorted(picks.tolist()):
        g, ply = pairs[i]
        start = "startpos" if g.start_sfen == STARTING_SFEN else f"sfen {g.start_sfen}"
        out.append((start, list(g.moves[:ply]), board_after(g, ply)[0]))
    return out, len(games), len(pairs)


def _last_info(lines: list[str], key: str) -> int:
    tokens = [line for line in lines if line.startswith("info depth")][-1].split()
    return int(tokens[tokens.index(key) + 1])


def _is_legal(board: cshogi.Board, usi: str) -> bool:
    """Whether ``usi`` is a legal move in ``board`` (the referee's test, not cshogi's ``is_legal``)."""
    from keisei_stream.shogi import legal_move_from_usi

    try:
        legal_move_from_usi(board, usi)
    except ValueError:
        return False
    return True


def clock(checkpoint: str, games_dir: str, count: int = 200, byoyomi: int = 300, seed: int = 0,
          margin: int = 300) -> dict:
    """Issue 18's answer-time measurement (module docstring, ``clock`` section)."""
    import tempfile

    from cshogi.usi.Engine import Engine

    from keisei_stream.play.engine.protocol import time_budget_ms

    picked, n_games, n_positions = _clock_positions(games_dir, count, seed)
    walls, reported, nodes, without_search, illegal = [], [], [], 0, 0
    slowest = (0.0, None)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(str(_engine_script(Path(tmp), checkpoint)))
        engine.setoption("ByoyomiMargin", margin)
        engine.isready()
        round_trips = []
        for _ in range(20):
            t = time.perf_counter()
            engine.isready()
            round_trips.append((time.perf_counter() - t) * 1000)
        for start, moves, board in picked:
            engine.position(moves=moves, sfen=start)
            lines: list[str] = []
            t = time.perf_counter()
            best, _ = engine.go(btime=0, wtime=0, byoyomi=byoyomi, listener=lines.append)
            ms = (time.perf_counter() - t) * 1000
            illegal += best not in ("resign", "win") and not _is_legal(board, best)
            walls.append(ms)
            reported.append(_last_info(lines, "time"))
            nodes.append(_last_info(lines, "nodes"))
            without_search += nodes[-1] == 0
            if ms > slowest[0]:
                slowest = (ms, f"position {start}" + (" moves " + " ".join(moves) if moves else ""))
        engine.quit()
    w = np.array(walls)
    budget = time_budget_ms(0, 0, byoyomi, 1, margin)
    return {
        "checkpoint": checkpoint, "games_dir": games_dir, "games": n_games, "positions_in_games": n_positions,
        "positions": len(walls), "go": f"go btime 0 wtime 0 byoyomi {byoyomi}", "byoyomi_margin_ms": margin,
        "budget_ms": budget, "baseline_isready_round_trip_ms": round(statistics.median(round_trips), 2),
        "wall_ms": {"max": round(float(w.max()), 1), "p99": round(float(np.percentile(w, 99)), 1),
                    "p50": round(float(np.percentile(w, 50)), 1), "min": round(float(w.min()), 1)},
        "over_byoyomi": int((w > byoyomi).sum()), "over_budget": int((w > budget).sum()),
        "engine_time_ms_max": max(reported), "nodes_median": int(statistics.median(nodes)),
        "answered_without_search": without_search, "illegal": int(illegal), "slowest_position": slowest[1],
    }


def throughput(args) -> dict:
    """The throughput sections (module docstring) for the parsed arguments."""
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    result = {"config": Path(args.config).name, "model": cfg.model.model_dump(),
              "parameters": count_parameters(model), "nodes_per_position": args.nodes, "positions": 4,
              "repeats": args.repeats}
    torch.set_num_threads(1)
    result["cpu_1_thread"] = bench_device(model, cfg, torch.device("cpu"), args)
    if torch.cuda.is_available() and not args.no_cuda:
        dev = torch.device("cuda")
        result["cuda"] = bench_device(model, cfg, dev, args)
        result["cuda_device"] = torch.cuda.get_device_name(dev)
    if not args.no_layout:
        result["layout"] = layout()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--nodes", type=int, default=512, help="simulations per position")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per forward-rate measurement")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--no-layout", action="store_true")
    p.add_argument("--clock-checkpoint", default=None, help="clock section: the engine's checkpoint")
    p.add_argument("--clock-games", default=None, help="clock section: a run's game archive (runs/RUN/games)")
    p.add_argument("--clock-positions", type=int, default=200)
    p.add_argument("--clock-byoyomi", type=int, default=300, help="ms")
    p.add_argument("--clock-only", action="store_true", help="only the clock section")
    args = p.parse_args(argv)
    if args.clock_only or args.clock_checkpoint:
        if not (args.clock_checkpoint and args.clock_games):
            p.error("the clock section needs --clock-checkpoint and --clock-games")
    result = {"benchmark": "search", "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    if not args.clock_only:
        result["throughput"] = throughput(args)
    if args.clock_checkpoint:
        result["clock"] = clock(args.clock_checkpoint, args.clock_games, args.clock_positions, args.clock_byoyomi)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
