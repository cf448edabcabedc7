"""Packages import only downward: cli -> (train, evaluate) -> tasks -> (data, io) -> models -> config -> moe ->
runtime -> errors. Siblings do not import each other."""

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "moe_cli"
RANK = {"errors": 0, "runtime": 0.5, "moe": 1, "config": 2, "models": 3, "data": 4, "io": 4, "tasks": 5,
        "train": 6, "evaluate": 6, "cli": 7}


def unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "moe_cli" and len(parts) > 1 else None


def test_packages_import_only_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        own = rel.parts[0].removesuffix(".py")
        if own not in RANK:  # moe_cli/__init__.py and __main__.py sit on top
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                other = unit(name)
                if other is None or other == own or other not in RANK:
                    if other is not None and other not in RANK and other != own:
                        bad.append(f"{rel}: imports {name} (package not in the layering)")
                    continue
                if RANK[other] >= RANK[own]:
                    bad.append(f"{rel}: imports {name} ({own} may not import {other})")
    assert not bad, "\n".join(bad)
