"""The manual's generated pages cannot go stale: the configuration reference lists every field of
every pydantic model with its default and description, and the Redis keys page every key of
``Keys`` (docs/hooks.py generates both at build time; CI builds the site with ``--strict``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from keisei_stream.config import Config
from keisei_stream.wire.keys import Keys

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(markdown: str) -> dict[str, list[str]]:
    """Table rows of ``markdown`` by their first cell's code text."""
    out = {}
    for line in markdown.splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if m:
            out[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
    return out


def test_the_configuration_page_lists_every_field_with_default_and_description():
    rows = _rows(_hooks().config_reference())
    fields = [(section, name, field) for section, sf in Config.model_fields.items()
              for name, field in sf.annotation.model_fields.items()]
    assert len(fields) > 60
    for section, name, field in fields:
        row = rows.get(f"{section}.{name}")
        assert row is not None, f"{section}.{name} missing from the configuration page"
        kind, default, shipped, description = row
        default_value = field.default_factory() if field.default_factory else field.default
        assert yaml.safe_load(default.strip("`")) == default_value, (section, name, default)
        assert field.description and description == " ".join(field.description.split()).replace("|", "\\|")
    assert len(rows) == len(fields)  # nothing else


def test_the_configuration_page_shows_what_the_shipped_configs_set():
    rows = _rows(_hooks().config_reference())
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for section, values in quickstart.items():
        for name, value in values.items():
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            assert f"quickstart: `{shown}`" in rows[f"{section}.{name}"][2], (section, name)


def test_the_keys_page_lists_every_key_of_keys():
    """Every attribute of ``Keys`` that names a key (a plain key, or a method making one of a
    family) has its row, with a type, a writer and a meaning."""
    rows = _rows(_hooks().keys_reference())
    k = Keys("r")
    found = set()
    for attr in dir(Keys):
        if attr.startswith("_") or attr in ("run", "prefix"):
            continue
        value = getattr(k, attr)
        if callable(value):
            value = value("ID")
        if isinstance(value, str) and value.startswith(k.prefix) and not value.endswith("*"):
            found.add(value[len(k.prefix):].replace("ID", "{id}"))
    # method families name their argument by what it is
    found = {"weights:blob:{sha256}" if f.startswith("weights:blob:") else f for f in found}
    assert len(found) >= 20
    for key in found:
        assert key in rows, f"{key} missing from the Redis keys page"
        kind, writer, meaning = rows[key]
        assert kind and writer and len(meaning) > 20, key
    assert set(rows) == found


@pytest.mark.parametrize("page", ["configuration.md", "redis-keys.md"])
def test_the_pages_ask_for_the_generated_parts(page):
    text = (ROOT / "docs" / page).read_text()
    assert "<!-- generated: " in text


def test_the_api_reference_names_every_module():
    hooks = _hooks()
    text = hooks.api_reference("keisei_stream.wire")
    for module in (ROOT / "keisei_stream" / "wire").glob("*.py"):
        if module.stem != "__init__":
            assert f"::: keisei_stream.wire.{module.stem}\n" in text + "\n"
