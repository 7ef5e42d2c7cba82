"""Config loading: every shipped file validates, errors name the dotted field, overrides apply."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from keisei_stream.config import Config, ConfigError, config_from_json, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny", "quickstart", "gpu"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.run.id == name
    assert config_from_json(cfg.to_json()) == cfg


def test_defaults_without_file():
    assert load_config(None) == Config()


def test_override_parses_yaml_values():
    cfg = load_config(CONFIGS / "tiny.yaml", ["ppo.epochs=3", "ppo.value_clip=0.2", "eval.opponents=[random]"])
    assert cfg.ppo.epochs == 3 and cfg.ppo.value_clip == 0.2 and cfg.eval.opponents == ["random"]


@pytest.mark.parametrize(
    "override, path",
    [
        ("ppo.clip_epsilon=0", "ppo.clip_epsilon"),
        ("ppo.no_such_key=1", "ppo.no_such_key"),
        ("model.channels=abc", "model.channels"),
        ("stream.weights_dtype=float16", "stream.weights_dtype"),
        ("nosection.key=1", "nosection"),
        ("run.id=has space", "run.id"),
    ],
)
def test_bad_values_name_the_field(override, path):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert f"{path}:" in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["ppo.epochs"])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("worker:\n  games: 4\n  gamez: 5\n")
    with pytest.raises(ConfigError, match=r"worker\.gamez: Extra inputs are not permitted"):
        load_config(f)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("worker: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_cross_field_check():
    with pytest.raises(ConfigError, match="stream: .*heartbeat_ttl_s must exceed heartbeat_s"):
        load_config(None, ["stream.heartbeat_s=5", "stream.heartbeat_ttl_s=4"])


def test_config_from_json_rejects_garbage():
    with pytest.raises(ConfigError, match="not JSON"):
        config_from_json(b"\xff\x00")


def _field_paths(model, prefix=""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _field_paths(ann, f"{prefix}{name}.")


def test_every_field_has_a_description():
    missing = [path for path, field in _field_paths(Config) if not (field.description or "").strip()]
    assert not missing, f"config fields without a description: {missing}"


def test_a_config_that_cannot_make_progress_fails_at_start():
    with pytest.raises(ConfigError, match=r"stream\.max_backlog.*ppo\.samples_per_update"):
        load_config(CONFIGS / "tiny.yaml", ["stream.max_backlog=2", "stream.batch_positions=64",
                                            "ppo.samples_per_update=256"])
    load_config(CONFIGS / "tiny.yaml", ["stream.max_backlog=4", "stream.batch_positions=64",
                                        "ppo.samples_per_update=256"])  # exactly enough
