"""udpflannel/core/ is pure: it imports nothing that does I/O and opens nothing.

ARCHITECTURE.md says so; this reads every core module's source (without running it)
and holds it to that: imports only from the standard library's pure modules and from
core itself, and no call to open().
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "udpflannel" / "core"
# errno: names for error numbers, no calls
PURE_STDLIB = {"__future__", "dataclasses", "enum", "errno", "ipaddress", "json", "re", "struct", "typing"}


def imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    return found


def allowed(module: str) -> bool:
    return module in PURE_STDLIB or module == "udpflannel.core" or module.startswith("udpflannel.core.")


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io(path):
    tree = ast.parse(path.read_text(), str(path))
    assert {m for m in imported_modules(tree) if not allowed(m)} == set()
    opens = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"]
    assert opens == []


def test_the_scan_sees_io():
    tree = ast.parse("import os\nfrom socket import socket\nfrom udpflannel.host import tun\n")
    assert {m for m in imported_modules(tree) if not allowed(m)} == {"os", "socket", "udpflannel.host"}
