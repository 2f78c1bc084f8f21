"""The shape of the code: one import direction, no import circles, the stage list written once."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as dotted names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            # The library imports absolutely, so that this walk (and a reader) sees every edge.
            assert node.level == 0, f"{path.relative_to(ROOT)}:{node.lineno}: relative import"
            out.add(node.module or "")
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _library_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "hfi_core").rglob("*.py"))
    modules = {_module(p) for p in files}
    graph = {}
    for p in files:
        graph[_module(p)] = {m for m in _imports(p) if m in modules and m != _module(p)}
    return graph


def test_the_library_imports_no_entry_point_dag_or_benchmark():
    for p in sorted((ROOT / "hfi_core").rglob("*.py")):
        bad = {m for m in _imports(p) if m.split(".")[0] in ("tasks", "dags", "benchmarks", "airflow", "argparse")}
        assert not bad, f"{p.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_library_has_no_import_circle():
    graph = _library_graph()
    assert "hfi_core.stages" in graph and graph["hfi_core.steps"] >= {"hfi_core.stages", "hfi_core.store"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join(
                [*path, m, n][path.index(n) if n in path else 0 :]
            )
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_a_circle_would_be_found():
    """The walk above sees imports inside functions too: the check can fail."""
    imports = _imports(ROOT / "hfi_core" / "stages.py")
    assert "hfi_core.generation" in imports and "hfi_core.promotion" in imports  # both imported inside functions


def test_the_stage_names_are_listed_only_in_the_stage_table():
    """No tuple, list, set or dict literal outside ``STAGES`` is a list of stages (two or more
    strings, all stage names); config sections that share a name (``distill``) are not stages."""
    from hfi_core.stages import STAGES

    names = set(STAGES)
    found = []
    for p in sorted(ROOT.glob("*/**/*.py")):
        top = p.parts[len(ROOT.parts)]
        if top == "tests" or top.startswith(".") or "site-packages" in p.parts:
            continue
        tree = ast.parse(p.read_text())
        table = set()  # the table's own nodes: its rows name their upstream stages
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "STAGES":
                table = {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else (
                node.keys if isinstance(node, ast.Dict) else [])  # fmt: skip
            strings = [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(strings) >= 2 and set(strings) <= names and id(node) not in table:
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert found == [], f"stage names listed outside the table: {found}"
