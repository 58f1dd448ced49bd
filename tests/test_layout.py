"""The layout's size rules (issue 16): no function in src/ past 100 lines (a sign to split it
by responsibility), and the in-process engine stays a loop over the federation core (under 500
lines). The import layers themselves are import-linter contracts (`lint-imports` in CI)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "fedlora"


def test_no_function_in_src_is_longer_than_100_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_the_engine_is_under_500_lines():
    lines = sum(len(p.read_text().splitlines()) for p in (SRC / "engine").rglob("*.py"))
    assert 0 < lines < 500, lines
