"""What limits a run now, from the figures ``keisei status`` already reads, and the knob to turn.

Sample Factory prints "learner is likely a bottleneck" when its rollout workers wait for the
learner's queue (Petrenko et al. 2020, arXiv:2006.11751); the same reading here:

* **learner-bound**: workers wait on backpressure (their heartbeat's ``backpressure_share``: the
  share of the last ~30 s each spent waiting because the learner's credit held it back, averaged
  over live workers) or the backlog is near ``stream.max_backlog``, while the learner rarely waits
  for data;
* **worker-bound**: the learner waits for data (``time_share_wait`` of its last update: the share
  of the time between two updates it spent blocked on an empty stream) while no worker waits;
* **balanced**: neither waits much; **starting** / **unknown**: no update or no live worker yet.

A worker whose heartbeat has no ``backpressure_share`` (an older worker) counts by its ``state``
at the instant (1 when ``backpressure``, else 0): a snapshot that catches a worker playing between
two waits reads 0, which is why the share is published. It reads the heartbeat fields and the
status readers' ``backlog``,
not how backpressure is implemented, so it holds whether admission is a Lua script or a credit the
learner publishes. The GPU's busy share (``gpu_util_pct``, NVML's utilisation: the share of time a
kernel ran, which reads high for many small launches too) and the Redis round trip (``PING``, timed
by ``keisei status``) are shown when known.
"""

from __future__ import annotations

from typing import Any

#: A worker share (waiting on backpressure) or learner share (waiting for data) above this is "waits".
WAITS = 0.2
#: Below this, "does not wait".
IDLE = 0.05
#: The backlog is "full" at this share of ``stream.max_backlog``.
FULL = 0.8
#: A Redis round trip above this (ms) is named in the verdict.
SLOW_REDIS_MS = 5.0


def parse_float(v: Any) -> float | None:
    """A heartbeat or hash field as a float; None when missing or unreadable."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _waiting_share(w: dict) -> float:
    """A worker's recent share of time waiting on backpressure, in [0, 1]: its heartbeat's
    ``backpressure_share``, else its ``state`` at the instant (1 for ``backpressure``, else 0)."""
    share = parse_float(w.get("backpressure_share"))
    if share is None:
        return 1.0 if w.get("state") == "backpressure" else 0.0
    return min(1.0, max(0.0, share))


def figures(st: dict) -> dict[str, float | None]:
    """The figures the rule reads from :func:`keisei_stream.cli.status.collect_status`'s data:
    ``workers`` (live), ``workers_waiting`` (the mean over live workers of their recent share of
    time on backpressure, :func:`_waiting_share`), ``backlog_fill`` (backlog / ``max_backlog``, None when unknown),
    ``learner_wait`` (its last update's ``time_share_wait``), ``learner_train``, ``gpu_util_pct``,
    ``redis_ping_ms``, ``samples_per_s``, ``produced_per_s`` (the workers' ``positions_per_s`` summed)."""
    live = [w for w in st.get("workers", []) if str(w.get("alive", "1")) == "1" and w.get("state") != "stopped"]
    waiting = sum(_waiting_share(w) for w in live)
    ln, stream = st.get("learner", {}) or {}, st.get("stream", {}) or {}
    backlog, limit = parse_float(stream.get("backlog")), parse_float(stream.get("max_backlog"))
    return {
        "workers": float(len(live)),
        "workers_waiting": waiting / len(live) if live else None,
        "backlog_fill": backlog / limit if backlog is not None and limit else None,
        "learner_wait": parse_float(ln.get("time_share_wait")),
        "learner_train": parse_float(ln.get("time_share_train")),
        "gpu_util_pct": parse_float(ln.get("gpu_util_pct")),
        "redis_ping_ms": parse_float(st.get("redis_ping_ms")),
        "samples_per_s": parse_float(ln.get("samples_per_s")),
        "produced_per_s": sum(parse_float(w.get("positions_per_s")) or 0.0 for w in live) if live else None,
    }


def diagnose(st: dict) -> dict[str, Any]:
    """The verdict on a run's status (module docstring).

    Returns:
        ``limit`` (``learner``, ``workers``, ``balanced``, ``starting`` or ``unknown``), ``line``
        (one sentence with the figures), ``knob`` (what to turn), ``figures`` (:func:`figures`).
    """
    f = figures(st)
    ln = st.get("learner", {}) or {}
    extras = []
    if f["gpu_util_pct"] is not None:
        extras.append(f"learner GPU utilisation {f['gpu_util_pct']:.0f} % (NVML: share of time a kernel ran)")
    if f["redis_ping_ms"] is not None and f["redis_ping_ms"] > SLOW_REDIS_MS:
        extras.append(f"Redis round trip {f['redis_ping_ms']:.1f} ms (slow: check the server's load and network)")
    if ln.get("compile") == "compiling":
        extras.append("the learner trains eagerly until torch.compile is ready")
    tail = ("; " + "; ".join(extras)) if extras else ""

    def verdict(limit: str, line: str, knob: str) -> dict[str, Any]:
        return {"limit": limit, "line": line + tail, "knob": knob, "figures": f}

    if not f["workers"]:
        return verdict("unknown", "no live worker", "start workers (keisei run --workers N, or python -m workers)")
    if f["learner_wait"] is None:
        return verdict("starting", "no update yet", "wait for the first update")
    waiting, wait, fill = f["workers_waiting"] or 0.0, f["learner_wait"], f["backlog_fill"]
    fill_txt = f", backlog at {fill:.0%} of stream.max_backlog" if fill is not None else ""
    if (waiting >= WAITS or (fill is not None and fill >= FULL)) and wait < WAITS:
        return verdict("learner", f"the learner is likely the bottleneck: the workers waited {waiting:.0%} of their "
                                  f"recent time on backpressure{fill_txt}, the learner waited {wait:.0%} of its time for data",
                       "make the learner faster (learner.amp, model.compile, fewer ppo.epochs, a larger "
                       "ppo.minibatch_size, a GPU or more learner ranks: --learners N) or give it the cores of a "
                       "worker or two (fewer workers)")
    if wait >= WAITS and waiting < IDLE:
        return verdict("workers", f"the workers are likely the bottleneck: the learner waited {wait:.0%} of its "
                                  f"time for data, no worker waits on backpressure{fill_txt}",
                       "add self-play: more workers (--workers N), more games per worker (worker.games: larger "
                       "forward batches on a GPU), worker.device cuda where a GPU has room")
    return verdict("balanced", f"neither side waits much: workers on backpressure {waiting:.0%}, the learner "
                               f"waiting for data {wait:.0%}{fill_txt}", "nothing to turn")
