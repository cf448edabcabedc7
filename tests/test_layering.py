"""Packages import only downward: cli -> (train, evaluate) -> recipe -> tasks -> (data, io) -> models -> config ->
moe -> checks -> runtime -> errors. Siblings do not import each other, and no module imports another that imports
it back (directly or through others), inside a package either — function-level imports included."""

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "moe_cli"
RANK = {"errors": 0, "runtime": 0.5, "checks": 0.7, "moe": 1, "config": 2, "models": 3, "data": 4, "io": 4,
        "tasks": 5, "recipe": 5.5, "train": 6, "evaluate": 6, "cli": 7}


def unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "moe_cli" and len(parts) > 1 else None


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every moe_cli module ``path`` imports, wherever the import statement stands."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module != "moe_cli":  # `from moe_cli import __version__` is the top package's
                names += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
    return [n for n in names if n.split(".")[0] == "moe_cli"]


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {n for n in imports(path) if n in modules and n != name} for name, path in modules.items()}


def test_packages_import_only_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        own = rel.parts[0].removesuffix(".py")
        if own not in RANK:  # moe_cli/__init__.py and __main__.py sit on top
            continue
        for name in imports(path):
            other = unit(name)
            if other is None or other == own:
                continue
            if other not in RANK:
                bad.append(f"{rel}: imports {name} (package not in the layering)")
            elif RANK[other] >= RANK[own]:
                bad.append(f"{rel}: imports {name} ({own} may not import {other})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles_even_inside_a_package():
    g = graph()
    # a package's __init__ re-exports its modules: importing the package is not a use of every module in it
    edges = {m: {n for n in deps if not (m.startswith(n + ".") and n in g)} for m, deps in g.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The checker itself: two modules that import each other are reported."""
    pkg = tmp_path / "moe_cli"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("from moe_cli.io.b import x\n")
    (pkg / "io" / "b.py").write_text("def f():\n    from moe_cli.io.a import y\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_no_import_cycles_even_inside_a_package()
    except AssertionError as e:
        assert "moe_cli.io.a -> moe_cli.io.b -> moe_cli.io.a" in str(e)
    else:
        raise AssertionError("the cycle between a and b was not reported")
