"""Package boundaries (the layout the README shows), checked rather than promised.

Each sub-package is imported with all of its modules in a fresh interpreter, and the packages it
must not depend on have to be absent from ``sys.modules`` afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: package -> what it must never load. The library never imports the process shells; the process
#: shells import the library's algorithm and delivery, never its commands, operations or play.
FORBIDDEN = {
    "keisei_stream.shogi": ("torch", "redis", "keisei_stream.rl", "keisei_stream.wire", "keisei_stream.ops",
                            "keisei_stream.play", "keisei_stream.cli"),
    # the algorithm reads the batch format (wire.codec, wire.schema) but never talks to Redis
    "keisei_stream.rl": ("redis", "keisei_stream.ops", "keisei_stream.play", "keisei_stream.cli"),
    "keisei_stream.wire": ("torch", "keisei_stream.rl", "keisei_stream.ops", "keisei_stream.play", "keisei_stream.cli"),
    "keisei_stream.ops": ("torch", "keisei_stream.rl", "keisei_stream.play", "keisei_stream.cli"),
    "keisei_stream.play": ("keisei_stream.ops", "keisei_stream.cli"),
    # the engine (search, USI server) never needs Redis nor the evaluation side
    "keisei_stream.play.engine": ("redis", "keisei_stream.wire", "keisei_stream.ops", "keisei_stream.play.evaluation",
                                  "keisei_stream.cli"),
    "keisei_stream.play.evaluation": ("keisei_stream.ops", "keisei_stream.cli"),
    "keisei_stream.cli": (),
    "workers": ("learner", "keisei_stream.cli", "keisei_stream.ops", "keisei_stream.play"),
    "learner": ("workers", "keisei_stream.cli", "keisei_stream.ops", "keisei_stream.play"),
}
LIBRARY_FORBIDDEN = ("workers", "learner")

_PROBE = """
import importlib, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if m.name.endswith(".__main__"):
        continue
    importlib.import_module(m.name)
print(" ".join(sorted(sys.modules)))
"""


def loaded_by(package: str) -> set[str]:
    """Every module in ``sys.modules`` after importing ``package`` and all its modules in a fresh
    interpreter."""
    out = subprocess.run([sys.executable, "-c", _PROBE, package], check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return set(out)


def forbidden_in(package: str, loaded: set[str]) -> list[str]:
    """The names of :data:`FORBIDDEN` (and, for the library, the process shells) that ``loaded`` holds."""
    names = FORBIDDEN[package] + (LIBRARY_FORBIDDEN if package.startswith("keisei_stream.") else ())
    return [name for name in names if name in loaded or any(m.startswith(name + ".") for m in loaded)]


@pytest.mark.parametrize("package", FORBIDDEN)
def test_package_imports_only_what_it_may(package):
    bad = forbidden_in(package, loaded_by(package))
    assert not bad, f"{package} imports {bad}"


@pytest.mark.parametrize("package", ["workers", "learner"])
def test_a_planted_upward_import_in_a_process_shell_is_caught(package, tmp_path):
    """Copy the shell into a scratch tree with one added module that imports the command layer:
    the check must name it."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / package, tmp_path / package)
    (tmp_path / package / "planted.py").write_text("import keisei_stream.cli.main  # an upward import\n")
    out = subprocess.run([sys.executable, "-c", _PROBE, package], check=True, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert "keisei_stream.cli" in forbidden_in(package, set(out.stdout.split()))


def test_config_is_standalone():
    out = subprocess.run([sys.executable, "-c", "import sys, keisei_stream.config; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert "torch" not in out and "redis" not in out
