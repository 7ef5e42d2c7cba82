"""Package boundaries (the layout the manual shows, docs/architecture.md), checked rather than promised.

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
    # the experience contract (batch type, columns) sits below both the algorithm and the transport
    "keisei_stream.experience": ("torch", "redis", "keisei_stream.rl", "keisei_stream.wire", "keisei_stream.ops",
                                 "keisei_stream.play", "keisei_stream.cli"),
    # the algorithm fills and trains on batches (keisei_stream.experience) but never sees the transport
    "keisei_stream.rl": ("redis", "keisei_stream.wire", "keisei_stream.ops", "keisei_stream.play", "keisei_stream.cli"),
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


def import_graph(root) -> dict[str, set[str]]:
    """Module -> the project modules it imports, read from the source (every ``import`` statement,
    inside functions and ``TYPE_CHECKING`` blocks too); a package is its ``__init__``."""
    import ast

    mods = {}
    for pkg in ("keisei_stream", "workers", "learner"):
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, (f, is_pkg) in mods.items():
        deps = set()
        base = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    b = base
                    for _ in range(node.level - 1):
                        b = b.rpartition(".")[0]
                    target = b + ("." + node.module if node.module else "")
                for a in node.names:  # `from pkg import module` depends on the module itself
                    sub = f"{target}.{a.name}"
                    deps.add(sub if sub in mods else resolve(target))
        graph[mod] = deps - {None, mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    from pathlib import Path

    assert cycles(import_graph(Path(__file__).resolve().parent.parent)) == []


def test_an_import_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
