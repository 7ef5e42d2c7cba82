"""A run's published weights from Redis as a model for a ``redis:`` player
(:func:`load_model_from_redis`). Checkpoint files are loaded by
:func:`keisei_stream.play.engine.model_player.load_player_model`.

Errors come out as :class:`keisei_stream.play.players.SpecError`, since the model is named by a
player spec string.
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Union

from torch import nn

from keisei_stream.config import Config, ConfigError, config_from_json
from keisei_stream.play.engine.model_player import resolve_device
from keisei_stream.play.players import SpecError
from keisei_stream.rl import checkpoint
from keisei_stream.rl.model import build_model
from keisei_stream.wire import client, status, weights
from keisei_stream.wire.keys import Keys


def load_model_from_redis(url: str, run: str, version: Union[int, str] = "latest",
                          device: str = "cpu") -> tuple[nn.Module, Config, dict]:
    """Build a run's model from Redis: config from ``keisei:{run}:config``, weights from
    ``weights:latest`` (``version="latest"``), from the blob of an exact version (looked up in the
    ``weights:index`` sorted set, or ``weights:latest`` when it is that version; only the last
    ``stream.weights_keep`` blobs are kept) or from ``"sha256:HEX"`` (64 hex digits). The blob's
    SHA-256 is verified.

    Args:
        url: Redis URL (``redis://``, ``rediss://``, ``unix://``).
        run: run id.
        version: ``"latest"``, a version number (int or decimal str) or ``"sha256:HEX"``.
        device: as :func:`keisei_stream.play.engine.model_player.resolve_device`.

    Returns:
        ``(model, config, meta)``: the model in eval mode on ``device``, the run's
        :class:`keisei_stream.config.Config`, ``meta = {"version": int | None, "sha256": str}``
        (``version`` is None for a blob no longer in the index).

    Raises:
        SpecError: missing or bad config, missing weights, bad version text, a checksum mismatch,
            weights that do not fit the config, an unavailable device.
    """
    r = client.connect(url)
    keys = Keys(run)
    cfg_text = status.read_config(r, keys)
    if cfg_text is None:
        raise SpecError(f"run {run!r} has no config in Redis ({keys.config})")
    try:
        cfg = config_from_json(cfg_text)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    ver: Optional[int]
    version = str(version)
    try:
        if version == "latest":
            got = weights.read_latest_weights(r, keys)
            if got is None:
                raise SpecError(f"run {run!r} has no published weights")
            ver, sha, data = got
        else:
            ver, sha = _find_blob(r, keys, run, version)
            data = r.get(keys.weights_blob(sha))
    except weights.WeightsError as exc:
        raise SpecError(f"run {run!r}: {exc}") from None
    if data is None:
        raise SpecError(f"weights blob {sha} of run {run!r} is missing")
    if hashlib.sha256(data).hexdigest() != sha:
        raise SpecError(f"weights blob {sha} fails its SHA-256 check")
    dev = resolve_device(device)
    model = build_model(cfg.model)
    try:
        checkpoint.load_weights_bytes(model, data)
    except ValueError as exc:
        raise SpecError(f"weights blob {sha}: {exc}") from None
    model.to(dev).eval()
    return model, cfg, {"version": ver, "sha256": sha}


def _find_blob(r, keys: Keys, run: str, version: str) -> tuple[Optional[int], str]:
    """``(version or None, sha256)`` of the blob named by ``"sha256:HEX"`` or a version number."""
    if version.startswith("sha256:"):
        sha = version[7:].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise SpecError(f"bad sha256 {sha!r}")
        score = r.zscore(keys.weights_index, sha)
        return (int(score) if score is not None else None), sha
    try:
        ver = int(version)
    except ValueError:
        raise SpecError(f"bad weights version {version!r}") from None
    shas = r.zrangebyscore(keys.weights_index, ver, ver)
    if not shas:
        info = weights.read_latest_info(r, keys)
        if info is not None and info["version"] == ver:
            shas = [info["sha256"]]
    if not shas:
        raise SpecError(f"weights version {ver} of run {run!r} is not (or no longer) in Redis")
    sha = shas[0]
    return ver, sha.decode() if isinstance(sha, bytes) else sha
