"""Every public function and class of the runtime package carries a docstring (the contract)."""
from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "cxr_edge"


def _undocumented(path: Path) -> list[str]:
    out = []

    def walk(node, prefix=""):
        for n in node.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_"):
                if not ast.get_docstring(n):
                    out.append(f"{path.relative_to(RUNTIME.parent)}:{n.lineno} {prefix}{n.name}")
                if isinstance(n, ast.ClassDef):
                    walk(n, prefix + n.name + ".")
    walk(ast.parse(path.read_text()))
    return out


def test_every_public_runtime_function_is_documented():
    missing = [m for f in sorted(RUNTIME.rglob("*.py")) for m in _undocumented(f)]
    assert not missing, "public functions/classes without a docstring:\n" + "\n".join(missing)
