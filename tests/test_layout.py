"""The package layout the README promises: no import cycle inside moelab/, no module over ~500 lines, and
`import moelab` never imports transformers."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moelab"


def _imports() -> dict[str, set[str]]:
    mods = {p.stem: p for p in PKG.glob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("moelab."):
                    deps.add(node.module.split(".")[1])
                elif node.module == "moelab":
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moelab."))
        graph[name] = (deps & set(mods)) - {name}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            assert state.get(m) != 1, f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}"
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_modules_stay_small():
    long = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > 550}
    assert not long, f"split these by concern: {long}"


def test_import_moelab_does_not_import_transformers():
    code = "import sys, moelab, moelab.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
