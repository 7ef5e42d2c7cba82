"""Run configuration: pydantic v2 models loaded from YAML with ``--set`` overrides.

Every section is a strict model (unknown keys are errors). :func:`load_config` turns any
problem into a :class:`ConfigError` whose message names the field's dotted path
(``ppo.clip_epsilon: Input should be greater than 0``), so a bad file fails at start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the dotted field path."""


#: The exit status of a process stopped by a configuration error (``EX_CONFIG`` of BSD's
#: sysexits.h): restarting it cannot help, so ``keisei run``'s supervisor stops the run instead.
EXIT_CONFIG = 78


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    """Identity and places of a run."""

    id: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="run id, the `{run}` of every Redis key")
    dir: str = Field("runs", description="parent of the run directory {dir}/{id}/ (config, checkpoints, metrics.jsonl, "
                     "games, eval, logs, the private Redis' files)")
    seed: int = Field(0, ge=0, description="base seed; a worker adds its process id unless given --seed")


class EnvConfig(_Section):
    """Shogi environment."""

    max_plies: int = Field(256, ge=2, le=65535, description="a game reaching this many plies is a draw")


class ModelConfig(_Section):
    """Actor-critic ResNet tower."""

    channels: int = Field(64, ge=4, le=1024, description="convolution channels of the residual tower")
    blocks: int = Field(4, ge=0, le=64, description="residual blocks in the tower")
    se: bool = Field(True, description="squeeze-and-excitation in every residual block")
    se_ratio: int = Field(4, ge=1, le=64, description="SE bottleneck = channels // se_ratio")
    policy_head: Literal["pointer", "dense"] = Field(
        "pointer", description="pointer: from-square x to-square bilinear scores; dense: Linear to 13,527 logits")
    policy_dim: int = Field(32, ge=4, le=512, description="query/key width of the pointer policy head")
    policy_planes: int = Field(8, ge=1, le=256, description="1x1-conv planes feeding the dense policy's linear layer")
    value_hidden: int = Field(128, ge=8, le=4096, description="hidden units of the value head's MLP")
    compile: bool = Field(False, description="torch.compile the model (learner)")


class PPOConfig(_Section):
    """PPO hyper-parameters (Schulman et al. 2017, arXiv:1707.06347)."""

    learning_rate: float = Field(3e-4, gt=0, le=1.0, description="AdamW learning rate at the start of the schedule")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate decay over lr_schedule_updates updates")
    lr_schedule_updates: int = Field(10_000, ge=1, description="updates over which linear/cosine decay runs")
    lr_final_fraction: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of learning_rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay (not on norms and biases)")
    gamma: float = Field(0.99, gt=0, le=1.0, description="discount per ply")
    gae_lambda: float = Field(0.95, ge=0, le=1.0, description="GAE lambda (Schulman et al. 2015, arXiv:1506.02438)")
    clip_epsilon: float = Field(0.2, gt=0, lt=1.0, description="PPO ratio clip: the ratio is clipped to [1-eps, 1+eps]")
    is_weight_clip: float = Field(
        1.0, gt=0, description="truncation of the importance weight pi_prox/mu of lagged or tempered data "
                               "(IMPALA's rho_bar; decoupled PPO, Hilton et al. 2021)")
    value_clip: Optional[float] = Field(None, gt=0, description="clip range of the value loss; null = unclipped")
    value_coef: float = Field(0.5, ge=0, description="weight of the value loss in the total loss")
    entropy_coef: float = Field(0.01, ge=0, description="weight of the entropy bonus (entropy over legal moves)")
    epochs: int = Field(4, ge=1, le=100, description="passes over the update's positions")
    minibatch_size: int = Field(256, ge=1, description="positions per gradient step")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    target_kl: Optional[float] = Field(0.03, gt=0, description="stop the epochs early past this approx KL; null = never")
    normalize_advantages: bool = Field(True, description="normalise advantages per minibatch to mean 0, std 1")
    recompute_values: bool = Field(False, description="GAE advantages and returns from the values of the model at the "
                                   "start of the update (as IMPALA's V-trace uses the learner's values), not from the "
                                   "stale values the workers recorded")
    samples_per_update: int = Field(4096, ge=1, description="positions gathered before one PPO update")
    max_policy_lag: int = Field(32, ge=0, description="positions from versions older than current - lag are dropped "
                                                     "(counted as stale); younger ones are corrected by the truncated "
                                                     "importance weight of decoupled PPO")


class StreamConfig(_Section):
    """Redis stream, weights and observability settings shared by all processes."""

    max_backlog: int = Field(64, ge=1, description="the run's window: unacknowledged experience entries in all "
                             "workers' streams together; each live worker's credit is ceil(max_backlog / live workers) "
                             "entries in its own stream before it waits")
    batch_positions: int = Field(1024, ge=1, description="a worker sends a batch once it holds this many positions")
    block_ms: int = Field(1000, ge=1, le=60_000, description="XREADGROUP BLOCK time")
    read_count: int = Field(16, ge=1, description="entries per XREADGROUP")
    claim_idle_ms: int = Field(60_000, ge=100, description="entries pending longer than this are claimed from dead learners")
    weights_keep: int = Field(4, ge=1, description="weights blobs kept in Redis")
    weights_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the published weights blobs (bfloat16 halves their bytes)")
    weights_poll_s: float = Field(2.0, gt=0, description="workers poll weights:latest this often (pub/sub is a hint)")
    deadletter_maxlen: int = Field(10_000, ge=1, description="approximate cap (MAXLEN ~) of the deadletter stream")
    metrics_maxlen: int = Field(100_000, ge=1, description="approximate cap of the metrics stream")
    games_maxlen: int = Field(10_000, ge=1, description="approximate cap of the games stream")
    eval_maxlen: int = Field(10_000, ge=1, description="approximate cap of the eval stream")
    heartbeat_s: float = Field(5.0, gt=0, description="seconds between heartbeat/status writes of every process (a "
                               "worker's heartbeat is one of its few steady commands on the primary: 0.2/s at 5 s); "
                               "the learner reads the roster, heartbeats and stream lengths every max(heartbeat_s, "
                               "heartbeat_ttl_s / 3) seconds")
    heartbeat_ttl_s: float = Field(30.0, gt=0, description="seconds after its last heartbeat that a silent "
                                   "worker is shown as not alive (its heartbeat stream stays)")
    backoff_max_s: float = Field(2.0, gt=0, description="cap (seconds) of a worker's exponential backoff while "
                                 "the backlog is full (10 ms doubling)")
    wait_replicas: int = Field(0, ge=0, le=64, description="replicas that must hold the learner's acknowledgements and "
                               "weights before it goes on (WAIT; the promotable replicas of a Sentinel group: 1 keeps "
                               "them through a failover); 0 = never wait")
    wait_ms: int = Field(1000, ge=1, le=60_000, description="longest WAIT for wait_replicas (ms); a shortfall is logged "
                         "and counted (unreplicated_writes), never an error")

    @model_validator(mode="after")
    def _ttl_exceeds_heartbeat(self) -> "StreamConfig":
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_s")
        return self

    @property
    def learner_refresh_s(self) -> float:
        """Seconds between the learner's readings of the roster and of every roster worker's
        heartbeat and stream length (the credit, overruns): ``max(heartbeat_s, heartbeat_ttl_s /
        3)``. A worker's liveness is not known finer than its TTL, and each reading costs the
        primary two commands per worker (10 s at the defaults: 0.2 commands per worker per second)."""
        return max(self.heartbeat_s, self.heartbeat_ttl_s / 3)


_DEVICE = r"^(auto|cpu|cuda(:[0-9]{1,3})?)$"


class WorkerConfig(_Section):
    """Self-play worker."""

    games: int = Field(64, ge=1, le=4096, description="games played at once (one forward pass per step and group)")
    threads: int = Field(1, ge=1, le=256, description="torch intra-op threads")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of self-play moves")
    record_games: bool = Field(True, description="write finished games to the games stream")
    device: str = Field("auto", pattern=_DEVICE, description="where the self-play forward pass runs: auto (cuda "
                        "when present), cpu, cuda or cuda:N; on a GPU the games are split into two groups whose "
                        "board steps (CPU) and forward passes (GPU) overlap")
    amp: bool = Field(True, description="bf16 autocast of the forward pass on CUDA (ignored on CPU)")
    segment_plies: int = Field(32, ge=1, le=65535, description="a game's positions leave in segments of this many "
                               "plies, and at its end (the manual's RL page: segments and the look-ahead)")
    lookahead_plies: int = Field(32, ge=0, le=65535, description="plies played after a cut before its segment "
                                 "leaves, carrying the look-ahead advantage of the position after the cut "
                                 "(0: at once, with the bootstrap value alone)")


class LearnerConfig(_Section):
    """Learner."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="training device; auto = cuda when available, else cpu")
    threads: int = Field(0, ge=0, le=256, description="torch intra-op threads on CPU; 0 = torch default")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    checkpoint_every: int = Field(20, ge=1, description="updates between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept in runs/{id}/checkpoints")
    tensorboard: bool = Field(True, description="write TensorBoard event files to runs/{id}/tensorboard")
    wandb: bool = Field(False, description="log metrics to Weights & Biases (needs the wandb package)")
    wandb_project: str = Field("keisei-stream", description="W&B project name")
    prefetch: bool = Field(False, description="read, decode and validate the next entries in the main thread while "
                           "the training thread runs the update (meant for a GPU learner; on 2 CPU cores it cost "
                           "about 25 % of the trained positions/s, see the results page)")
    dist_timeout_s: float = Field(300.0, gt=0, description="several learner ranks (torchrun): seconds a collective "
                                  "waits for a missing rank before every rank exits for torchrun to restart them")
    check_sync_every: int = Field(10, ge=0, description="several learner ranks: updates between checks that every "
                                  "rank holds bitwise identical parameters (sha256, logged); 0 = never")


class EvalConfig(_Section):
    """Evaluation."""

    games: int = Field(100, ge=1, description="games per evaluated version and opponent")
    opponents: list[str] = Field(default_factory=lambda: ["random", "greedy"],
                                 description="player specs evaluated against (see keisei eval --help)")
    every_versions: int = Field(10, ge=1, description="continuous evaluation of every K-th version")
    opening_plies: int = Field(0, ge=0, description="random opening plies before the players take over")
    processes: int = Field(1, ge=1, le=256, description="processes playing evaluation games in parallel")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of the evaluated version's moves; "
                                                       "0 = argmax")


class Config(_Section):
    """The whole run configuration."""

    run: RunConfig = Field(default_factory=RunConfig, description="identity, directory and seed of the run")
    env: EnvConfig = Field(default_factory=EnvConfig, description="the shogi environment")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the actor-critic network")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO and GAE hyper-parameters")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Redis stream, weights and observability settings")
    worker: WorkerConfig = Field(default_factory=WorkerConfig, description="self-play workers")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="the learner process")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")

    @model_validator(mode="after")
    def _progress_is_possible(self) -> "Config":
        # Workers together stop adding at about max_backlog unacknowledged entries (their credits)
        # of at least batch_positions positions each; if that cannot reach samples_per_update the
        # learner would wait forever.
        held = self.stream.max_backlog * self.stream.batch_positions
        if held < self.ppo.samples_per_update:
            raise ValueError(
                f"stream.max_backlog ({self.stream.max_backlog}) x stream.batch_positions "
                f"({self.stream.batch_positions}) = {held} positions, fewer than ppo.samples_per_update "
                f"({self.ppo.samples_per_update}): the learner could never gather one update")
        return self

    def to_json(self) -> str:
        """The resolved config as JSON text (what the learner writes to the ``config`` key)."""
        return self.model_dump_json()

    def to_yaml(self) -> str:
        """The resolved config as YAML text (what the run directory keeps)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{path}: {e['msg']}")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its path and a YAML-parsed value.

    Raises:
        ConfigError: when the text has no ``=`` or an empty path.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not path or any(not p for p in path):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:  # pragma: no cover - yaml accepts nearly anything
        raise ConfigError(f"override {text!r}: {exc}") from exc
    return path, value


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    """Validate a plain mapping (plus ``section.key=value`` overrides) into a :class:`Config`.

    Raises:
        ConfigError: naming the dotted path of every bad field, unknown keys included.
    """
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types only
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({source}): top level must be a mapping")
    for ov in overrides or []:
        path, value = parse_override(ov)
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
            node = nxt
        node[path[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: YAML file; None for the built-in defaults.
        overrides: ``section.key=value`` strings; values are parsed as YAML (``ppo.epochs=2``).

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or invalid value (the field is named).
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML in {path}: {exc}") from None
    return config_from_dict(data, overrides, source)


def config_from_json(text: str | bytes) -> Config:
    """Rebuild a config from the JSON the learner stored under the ``config`` key.

    Raises:
        ConfigError: when the text is not valid JSON or not a valid config.
    """
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config in Redis is not JSON: {exc}") from None
    return config_from_dict(data, None, "redis")
