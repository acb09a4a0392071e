"""prior/'s import graph: no cycles, nothing imports the entry point, the contract stays torch-free.

Every import counts, those inside functions too: a cycle through a lazy import is still a
cycle in what a reader must hold in mind, and it breaks once someone moves the import up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prior"


def imports_of(path: Path) -> set[str]:
    """The prior modules that prior/<path> imports (as bare names: 'contract', 'pipeline')."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 0 and not (base == "prior" or base.startswith("prior.")):
                continue
            base = base.removeprefix("prior").removeprefix(".") if node.level == 0 else base
            if base:
                found.add(base.split(".")[0])
            else:  # from . import a, b
                found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("prior."))
    return found & modules - {path.stem}


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_reads_every_kind_of_import(tmp_path, monkeypatch):
    (tmp_path / "one.py").write_text("from . import two\nfrom .three import x\nimport prior.four\n"
                                     "def f():\n    from prior.five import y\n    from prior import six\n")
    for name in ("two", "three", "four", "five", "six", "seven"):
        (tmp_path / f"{name}.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert imports_of(tmp_path / "one.py") == {"two", "three", "four", "five", "six"}


def test_no_import_cycle_in_prior():
    edges = graph()
    assert "contract" in edges and edges["cli"], "the graph was read"
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_nothing_imports_the_entry_point():
    importers = sorted(module for module, imported in graph().items() if "cli" in imported and module != "__main__")
    assert importers == [], f"{importers} import prior/cli.py; it is only the entry point"


def test_the_contract_and_the_options_import_no_torch():
    code = ("import sys; import prior.contract, prior.arguments, prior.cli; "
            "print(sorted(m for m in ('torch', 'torchvision', 'pyarrow', 'faiss', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert graph()["contract"] == set()  # the bottom of the graph
