"""The size rule of the package: a module of utils/ fits in 500 lines and a function in 80, so a
reader finds one job per unit. Lists every offender, not only the first."""

from __future__ import annotations

import ast
from pathlib import Path

UTILS = Path(__file__).resolve().parents[1] / "utils"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def oversized(root: Path) -> list[str]:
    """'path: N lines' for each module over the limit and 'path:line name: N lines' for each
    function (methods and nested functions included) over its limit."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(root.parent)
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_over_the_limit():
    assert oversized(UTILS) == []


def test_the_rule_finds_a_long_module_and_a_long_function(tmp_path):
    pkg = tmp_path / "utils"
    pkg.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long_function.py").write_text(f"class A:\n    def f(self):\n{body}")
    (pkg / "long_module.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "fine.py").write_text("def g():\n    return 1\n")
    assert oversized(pkg) == [
        "utils/long_function.py:2 f: 81 lines",
        f"utils/long_module.py: {MAX_MODULE_LINES + 1} lines",
    ]
