"""Self-play: N games stepped together with one batched forward pass per step, their positions sent
in segments.

:class:`SelfPlay` plays ``games`` games at once. Each step evaluates the current position of every
game (one forward pass per group of games), samples a move from the masked policy, records the
position (the 32-byte HCP, ply, repetition count, action, behaviour log-probability, value, model
version) and plays the move. A game's positions leave as a :class:`Segment` every
``segment_plies`` plies, ``lookahead_plies`` plies after the cut, carrying the bootstrap value and
look-ahead advantage of the position after the cut; a game's last segment leaves at its end with
its result, and :meth:`SelfPlay.flush` cuts every game at a stop, so nothing played is lost. Why
and how: the manual's RL page, "Segments and the look-ahead" (docs/rl.md), the one place the
mechanism is explained.

**On a GPU** the games form two groups: while one group's forward pass runs on the device, the
CPU steps the other group's boards (the compact inputs cross from pinned memory with non-blocking
copies and the moves are sampled on the device by
the dense path of :func:`~keisei_stream.rl.policy.sample_actions`, so the host never waits for the device
except for the results it needs next). Each group has its own boards and random generator, so the
pipelined order plays the same games as the plain one (``overlap=False``).

The worker process (``workers/worker.py``) is a shell around :class:`SelfPlay` and
:func:`segments_to_batch`; the benchmarks run the same code. Never imports redis.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from keisei_stream.rl.device import sync_allowed, use_device
from keisei_stream.rl.gae import compute_gae
from keisei_stream.rl.inputs import expand_on_device
from keisei_stream.rl.policy import act, sample_actions
from keisei_stream.shogi import NUM_ACTIONS, GameRecord, VecEnv
from keisei_stream.experience import ExperienceBatch, concat_batches, schema

#: Most legal moves of a shogi position (593 is the known maximum): the pinned buffer of a group's
#: legal actions holds this many per game.
MAX_LEGAL_MOVES = 600


@dataclass
class Segment:
    """Consecutive positions of one game, ready to send.

    Attributes:
        positions: one ``(k, *row shape)`` array per column of ``schema.POSITION``.
        result: the game's result (+1 Black won, -1 White won, 0 draw) when it ended here, else 0.
        reason: its :class:`~keisei_stream.shogi.EndReason` code, ``NONE`` (0) for a cut.
        bootstrap: a cut segment's value of the position after its last move (side to move's
            view, [-1, 1]); 0 when the game ended.
        bootstrap_advantage: that position's GAE advantage over the look-ahead (same view); 0
            without look-ahead or when the game ended.
        game: the game's number (the same for all its segments).
    """

    positions: dict[str, np.ndarray]
    result: int
    reason: int
    bootstrap: float
    bootstrap_advantage: float
    game: int

    @property
    def num_positions(self) -> int:
        return int(self.positions["ply"].shape[0])


@dataclass
class Step:
    """What one :meth:`SelfPlay.step` produced: the segments ready to send, the records of the
    games that ended (for the games stream), and the positions played."""

    segments: list[Segment] = field(default_factory=list)
    finished: list[GameRecord] = field(default_factory=list)
    positions: int = 0


@dataclass
class Trajectories:
    """Per-game buffers of the positions not yet sent.

    Attributes:
        length: ``(N,) int64`` positions held per game.
        columns: one array per column of ``schema.POSITION``, native-endian, shaped
            ``(N, capacity, *row shape)``: position ``t`` of game ``i`` is at ``[i, t]``.
    """

    length: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def empty(cls, n: int, capacity: int) -> "Trajectories":
        return cls(np.zeros(n, np.int64), schema.zeros(schema.POSITION, (n, capacity)))

    def record(self, values: dict[str, np.ndarray | int]) -> None:
        """Append one position to every game (``values``: per column ``(N, *row shape)`` or a scalar)."""
        rows, t = np.arange(len(self.length)), self.length
        for name, col in self.columns.items():
            col[rows, t] = values[name]
        self.length += 1

    def take(self, i: int, k: int | None = None) -> dict[str, np.ndarray]:
        """Copy out game ``i``'s first ``k`` positions (all when None; one ``(k, *row shape)``
        array per column) and move the rest to the front."""
        n = int(self.length[i])
        k = n if k is None else k
        out = {name: col[i, :k].copy() for name, col in self.columns.items()}
        for col in self.columns.values():
            col[i, :n - k] = col[i, k:n]
        self.length[i] = n - k
        return out


@dataclass
class _Pending:
    """A group's forward pass: launched, its results read by :meth:`SelfPlay._collect`."""

    version: int
    actions: np.ndarray | torch.Tensor
    log_prob: np.ndarray | torch.Tensor
    value: np.ndarray | torch.Tensor
    done: torch.cuda.Event | None = None


@dataclass
class _Group:
    """Games stepped together: their boards, unsent positions, game numbers and random generator."""

    env: VecEnv
    traj: Trajectories
    game: np.ndarray  # (n,) uint64
    rng: torch.Generator
    pinned: dict[str, torch.Tensor] = field(default_factory=dict)  # staging buffers (CUDA)
    pending: _Pending | None = None


class SelfPlay:
    """``games`` games of self-play with ``model`` (module docstring).

    Args:
        model: the actor-critic, on ``device``, in eval mode (weights may be replaced between
            steps, e.g. with :func:`~keisei_stream.rl.checkpoint.load_weights_bytes`).
        games: games played at once (split evenly over the groups).
        max_plies: a game reaching this many plies is a draw.
        segment_plies: positions per segment of a game still going on.
        lookahead_plies: plies played after a cut before its segment leaves (0: at once).
        gamma, lam: GAE's discount and lambda for the look-ahead advantage (the run's ``ppo``).
        temperature: sampling temperature (0 = argmax).
        seed: seeds the boards' openings and the sampling noise (group ``k``: ``seed + k``).
        device: where the forward pass runs.
        groups: groups of games (default 2 on CUDA, else 1).
        overlap: pipeline the groups (default: on CUDA); without it the groups take turns.
        amp: bf16 autocast on CUDA.
        opening_plies: random legal moves at the start of every game (``VecEnv``'s).

    Raises:
        ValueError: fewer games than groups, or bad arguments of the env.
    """

    def __init__(self, model: torch.nn.Module, *, games: int, max_plies: int, segment_plies: int,
                 temperature: float, seed: int, lookahead_plies: int = 0, gamma: float = 1.0, lam: float = 1.0,
                 device: torch.device | str = "cpu", groups: int | None = None, overlap: bool | None = None,
                 amp: bool = True, opening_plies: int = 0):
        self.model, self.device = model, use_device(device)  # a CUDA device with its index, current here
        cuda = self.device.type == "cuda"
        n_groups = groups or (2 if cuda else 1)
        if games < n_groups:
            raise ValueError(f"{games} games cannot make {n_groups} groups")
        self.overlap = cuda if overlap is None else overlap
        self.temperature, self.segment_plies, self.lookahead = float(temperature), int(segment_plies), int(lookahead_plies)
        self.gamma, self.lam = float(gamma), float(lam)
        self.amp = amp and cuda
        self._session = secrets.randbits(32) << 32  # game numbers: unique per worker session
        self._next_game = 0
        sizes = [len(a) for a in np.array_split(np.arange(games), n_groups)]
        self.groups = [self._group(n, VecEnv(n, max_plies, seed=seed + k, opening_plies=opening_plies), seed + k)
                       for k, n in enumerate(sizes)]

    def _group(self, n: int, env: VecEnv, seed: int) -> _Group:
        rng = torch.Generator(device=self.device).manual_seed(seed)
        g = _Group(env, Trajectories.empty(n, self.segment_plies + self.lookahead),
                   self._new_games(n), rng)
        if self.device.type == "cuda":
            def pinned(shape, dtype):
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            g.pinned = {"pieces": pinned((n, 284), torch.uint8), "scalars": pinned((n, 18), torch.float32),
                        "actions": pinned(n * MAX_LEGAL_MOVES, torch.int16), "counts": pinned(n, torch.int16),
                        "out_action": pinned(n, torch.int64), "out_log_prob": pinned(n, torch.float32),
                        "out_value": pinned(n, torch.float32)}
        return g

    def _new_games(self, n: int) -> np.ndarray:
        numbers = self._session + np.arange(self._next_game, self._next_game + n, dtype=np.uint64)
        self._next_game += n
        return numbers.astype(np.uint64)

    @property
    def num_games(self) -> int:
        return sum(g.env.num_games for g in self.groups)

    @property
    def unsent_positions(self) -> int:
        """Positions played and not yet in a segment (what :meth:`flush` would cut)."""
        return int(sum(g.traj.length.sum() for g in self.groups))

    # ------------------------------------------------------------------------------ stepping
    def step(self, version: int) -> Step:
        """One move in every game, played by model ``version`` (recorded with each position;
        with ``overlap`` a group's forward pass may have been launched in the previous step, under
        the version current then)."""
        out = Step()
        for k, g in enumerate(self.groups):
            pending = g.pending or self._launch(g, version)
            g.pending = None
            if self.overlap:  # the next group's forward pass runs while this group's boards step
                nxt = self.groups[(k + 1) % len(self.groups)]
                if nxt is not g and nxt.pending is None:
                    nxt.pending = self._launch(nxt, version)
            self._advance(g, pending, out)
        return out

    def flush(self) -> list[Segment]:
        """Every game's unsent positions as cut segments, bootstrapped from one more forward pass
        (or the one in flight) over the current positions; nothing played is left unsent."""
        segments: list[Segment] = []
        for g in self.groups:
            pending = g.pending or self._launch(g, 0)
            g.pending = None
            _actions, _log_prob, value = self._collect(pending)
            for i in np.flatnonzero(g.traj.length):
                segments.append(Segment(g.traj.take(int(i)), 0, 0, float(value[i]), 0.0, int(g.game[i])))
        return segments

    def _advance(self, g: _Group, pending: _Pending, out: Step) -> None:
        """Cut the full segments (bootstrapped from this forward pass's values), record the
        positions, play the moves, and emit the segments of the games that ended."""
        actions, log_prob, value = self._collect(pending)
        out.segments += self._cut(g, value)
        hcp, ply, repetition, _turn = g.env.positions()
        g.traj.record({"hcp": hcp, "ply": ply, "repetition": repetition, "action": actions, "log_prob": log_prob,
                       "value": value, "version": pending.version})
        res = g.env.step(actions)
        out.positions += g.env.num_games
        for i, record in zip(np.flatnonzero(res.done), res.finished):
            out.segments.append(Segment(g.traj.take(int(i)), int(record.result), int(record.reason), 0.0, 0.0,
                                        int(g.game[i])))
            out.finished.append(record)
            g.game[i] = self._new_games(1)[0]

    def _cut(self, g: _Group, value: np.ndarray) -> list[Segment]:
        """The segments of ``g``'s games that hold ``segment_plies`` + ``lookahead_plies``
        positions: the first ``segment_plies`` leave, bootstrapped from the value of the position
        after them and its GAE advantage over the look-ahead (:func:`~keisei_stream.rl.gae.compute_gae`
        on the look-ahead's recorded values, itself bootstrapped from ``value``, this forward pass's
        values of the current positions); the look-ahead stays for the next segment."""
        s, h = self.segment_plies, self.lookahead
        cut = np.flatnonzero(g.traj.length >= s + h)
        if not len(cut):
            return []
        if h:
            window = g.traj.columns["value"][cut, s:s + h].reshape(-1)
            adv, _ = compute_gae(window, np.arange(0, len(window) + 1, h), np.zeros(len(cut)), self.gamma, self.lam,
                                 bootstrap=value[cut])
            boot, boot_adv = g.traj.columns["value"][cut, s], adv[::h]
        else:
            boot, boot_adv = value[cut], np.zeros(len(cut), np.float32)
        return [Segment(g.traj.take(int(i), s), 0, 0, float(b), float(a), int(g.game[i]))
                for i, b, a in zip(cut, boot, boot_adv)]

    # ------------------------------------------------------------------------------ the forward pass
    def _launch(self, g: _Group, version: int) -> _Pending:
        """Start the forward pass and sampling of ``g``'s current positions: done at once on the
        CPU; on CUDA queued on the device, its results copied back into pinned memory."""
        if self.device.type != "cuda":
            obs, mask = g.env.observe(copy=False)  # act() copies them into tensors before env.step
            return _Pending(version, *act(self.model, obs, mask, self.temperature, generator=g.rng))
        with torch.cuda.device(self.device):  # every implicit device below is the worker's
            return self._launch_cuda(g, version)

    def _launch_cuda(self, g: _Group, version: int) -> _Pending:
        """:meth:`_launch` on CUDA (module docstring): nothing here waits for the device."""
        compact, pin, n = g.env.observe_compact(), g.pinned, g.env.num_games
        m = len(compact["actions"])
        staged = {}
        for name in ("pieces", "scalars", "actions", "counts"):
            view = pin[name][:m] if name == "actions" else pin[name]
            view.copy_(torch.from_numpy(compact[name]))
            staged[name] = view.to(self.device, non_blocking=True)
        with torch.inference_mode():
            obs, mask = expand_on_device(staged["pieces"], staged["scalars"], staged["actions"], staged["counts"])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                logits, value = self.model(obs)
            actions, log_prob = sample_actions(logits.float(), mask, self.temperature, g.rng, dense=True)
            outs = (pin["out_action"][:n], pin["out_log_prob"][:n], pin["out_value"][:n])
            for host, dev in zip(outs, (actions, log_prob, value.float())):
                host.copy_(dev, non_blocking=True)
        # recorded on this worker's device's stream, whatever the thread's current device; a
        # blocking event: a worker waiting for it sleeps instead of spinning a core
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(self.device))
        return _Pending(version, *outs, done=done)

    @staticmethod
    def _collect(p: _Pending) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(actions (n,) int64, log_prob (n,) float32, value (n,) float32)`` of a launched pass
        (waiting for the device when it still runs)."""
        if p.done is None:
            return p.actions, p.log_prob, p.value
        with sync_allowed():  # the one wait of a step, for the results it needs (blocking: the core sleeps)
            p.done.synchronize()  # the copies into the pinned outputs have run
        return p.actions.numpy().copy(), p.log_prob.numpy().copy(), p.value.numpy().copy()


def segments_to_batch(segments: list[Segment]) -> ExperienceBatch:
    """One experience batch of ``segments`` (in order; ``batch_id`` and ``worker_id`` are set by
    the producer that sends it).

    Raises:
        ValueError: no segments.
    """
    if not segments:
        raise ValueError("no segments to batch")
    return concat_batches([
        ExperienceBatch("", "", **s.positions, segment_offsets=np.array([0, s.num_positions], np.uint32),
                        result=np.array([s.result], np.int8), reason=np.array([s.reason], np.uint8),
                        bootstrap=np.array([s.bootstrap], np.float32),
                        bootstrap_advantage=np.array([s.bootstrap_advantage], np.float32),
                        game=np.array([s.game], np.uint64))
        for s in segments])


class UniformPolicy(torch.nn.Module):
    """A stand-in actor-critic: the same logit for every action (uniformly random moves, log-prob
    ``-log(legal moves)``) and values drawn uniformly from [-1, 1] with its own seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = obs.shape[0]
        return torch.zeros(b, NUM_ACTIONS), torch.rand(b, generator=self.gen) * 2 - 1


def random_policy_batch(num_positions: int, *, max_plies: int = 256, games: int = 32, segment_plies: int = 0,
                        lookahead_plies: int = 0, seed: int = 0, version: int = 1, worker_id: str = "w0",
                        batch_id: str = "w0:test:0", opening_plies: int = 0) -> ExperienceBatch:
    """A batch of uniformly random self-play, played and cut by :class:`SelfPlay` itself with a
    :class:`UniformPolicy`: realistic positions for tests and benchmarks.

    Steps ``games`` games until the segments sent hold at least ``num_positions`` positions.
    ``segment_plies`` 0 sends whole games only; otherwise games are cut as workers cut them (with
    ``lookahead_plies``, gamma = lambda = 1). ``version`` is the model version recorded.
    Deterministic for given arguments (game numbers aside).
    """
    sp = SelfPlay(UniformPolicy(seed), games=games, max_plies=max_plies, segment_plies=segment_plies or max_plies,
                  lookahead_plies=lookahead_plies if segment_plies else 0, temperature=1.0, seed=seed,
                  opening_plies=opening_plies)
    segments: list[Segment] = []
    total = 0
    while total < num_positions:
        new = sp.step(version).segments
        segments += new
        total += sum(x.num_positions for x in new)
    batch = segments_to_batch(segments)
    batch.worker_id, batch.batch_id = worker_id, batch_id
    return batch
