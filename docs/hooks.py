"""MkDocs hooks of the manual: the pages that must not go stale are generated from the code.

- ``<!-- generated: config -->`` becomes the configuration reference: every field of every section
  of :class:`keisei_stream.config.Config` with its type, bounds, default, the values the shipped
  ``configs/*.yaml`` set, and its description (:func:`config_reference`);
- ``<!-- generated: keys -->`` becomes the table of every key of a run
  (:func:`keisei_stream.wire.keys.key_table`, :func:`keys_reference`);
- ``<!-- generated: api PACKAGE -->`` becomes one API reference entry per module of ``PACKAGE``;
- rendered API pages lose the Sphinx roles of the docstrings (``:func:`` before a code span),
  which Markdown does not know.

``tests/test_docs.py`` checks that the generated pages name every field and every key.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
#: The configs whose values the reference shows beside the defaults.
CONFIG_FILES = ("tiny", "quickstart", "gpu")

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _cell(text: Any) -> str:
    """Text for one Markdown table cell (pipes escaped, one line)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    """``int``, ``float or null``, ``list of str``, ``one of `a`, `b```."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__} of " + ", ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: Any) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _yaml(value: Any) -> str:
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"


def config_sections() -> list[tuple[str, type[BaseModel], str]]:
    """``(section name, its model, its description)`` for every section of the config, in order."""
    from keisei_stream.config import Config

    return [(name, field.annotation, field.description or "") for name, field in Config.model_fields.items()]


def config_reference() -> str:
    """The configuration reference as Markdown: one table per section, one row per field."""
    shipped = {name: yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) or {} for name in CONFIG_FILES}
    parts = []
    for section, model, description in config_sections():
        parts.append(f"### `{section}`\n\n{description[:1].upper() + description[1:]}.\n")
        parts.append("| field | type | default | in configs/ | description |\n|---|---|---|---|---|")
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation)
            bounds = _bounds(field)
            shipped_values = ", ".join(f"{cfg}: {_yaml(values[section][name])}" for cfg, values in shipped.items()
                                       if name in (values.get(section) or {}))
            parts.append(f"| `{section}.{name}` | {_cell(kind)}{_cell(', ' + bounds) if bounds else ''} | "
                         f"{_cell(_yaml(_default(field)))} | {_cell(shipped_values)} | "
                         f"{_cell(field.description or '')} |")
        parts.append("")
    return "\n".join(parts)


def keys_reference() -> str:
    """The Redis keys of a run as one Markdown table (every row of ``key_table()``)."""
    from keisei_stream.wire.keys import key_table

    rows = ["| key (after `keisei:{run}:`) | type | written by | meaning |", "|---|---|---|---|"]
    for row in key_table():
        rows.append(f"| `{row.pattern}` | {_cell(row.kind)} | {_cell(row.writer)} | {_cell(row.meaning)} |")
    return "\n".join(rows) + "\n"


def api_reference(package: str) -> str:
    """One mkdocstrings directive (``::: module``) per module of ``package``, found on disk (so a
    module that is added, split or renamed needs no edit of the pages)."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    names = [package] if not hasattr(pkg, "__path__") else [
        m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")
        if not m.ispkg and not m.name.endswith("__main__")]
    return "\n\n".join(f"::: {name}" for name in sorted(names)) + "\n"


GENERATED = {"config": config_reference, "keys": keys_reference, "api": api_reference}
_MARK = re.compile(r"<!-- generated: (\w+)(?: ([\w.]+))? -->")
# a Sphinx role before a code span (":func:`~a.b`" renders as ":func:<code>~a.b</code>")
# (the leading colon is sometimes taken by the docstring parser as a "name: description" separator)
_ROLE = re.compile(r"(?<![\w:]):?(?:func|class|meth|mod|data|attr|exc|obj):(<code>)~?")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace each ``<!-- generated: NAME -->`` with :data:`GENERATED`'s ``NAME`` page part."""
    return _MARK.sub(lambda m: GENERATED[m.group(1)](*[a for a in m.groups()[1:] if a]), markdown)


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Drop the Sphinx roles that docstrings carry before code spans."""
    return _ROLE.sub(lambda m: m.group(1), html)
