"""Package boundaries (the layout the README shows), checked rather than promised.

Each sub-package is imported with all of its modules in a fresh interpreter, and the packages it
must not depend on have to be absent from ``sys.modules`` afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

LAYERS = ("shogi", "rl", "wire", "play", "cli")
ALWAYS_FORBIDDEN = ("workers", "learner")
FORBIDDEN = {
    "shogi": ("torch", "redis", "keisei_stream.rl", "keisei_stream.wire", "keisei_stream.play", "keisei_stream.cli"),
    "rl": ("redis", "keisei_stream.wire", "keisei_stream.play", "keisei_stream.cli"),
    "wire": ("torch", "keisei_stream.rl", "keisei_stream.play", "keisei_stream.cli"),
    "play": ("keisei_stream.cli",),
    "cli": (),
}

_PROBE = """
import importlib, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if m.name.endswith(".__main__"):
        continue
    importlib.import_module(m.name)
print(" ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_what_it_may(layer):
    out = subprocess.run([sys.executable, "-c", _PROBE, f"keisei_stream.{layer}"], check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    loaded = set(out)
    bad = [name for name in FORBIDDEN[layer] + ALWAYS_FORBIDDEN
           if name in loaded or any(m.startswith(name + ".") for m in loaded)]
    assert not bad, f"keisei_stream.{layer} imports {bad}"


def test_config_is_standalone():
    out = subprocess.run([sys.executable, "-c", "import sys, keisei_stream.config; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert "torch" not in out and "redis" not in out
