"""Imports point downwards (issue 11 section 5): the network adapters and the plain data at the
bottom never import the layers built on them, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MTA = Path(__file__).resolve().parents[2] / "mta"
ABOVE_NET = ("mta.delivery", "mta.sts", "mta.submission", "mta.tlsrpt", "mta.spool", "mta.app", "mta.cli",
             "mta.scheduler", "mta.config", "mta.preflight")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("module", ["net/dns.py", "net/tls.py", "model.py", "errors.py", "idn.py"])
def test_bottom_modules_import_nothing_above_them(module: str) -> None:
    path = MTA / module
    if not path.exists():
        pytest.skip(f"{module} does not exist")
    upward = sorted(m for m in _imports(path) if m.startswith(ABOVE_NET))
    assert upward == [], f"mta/{module} imports {upward}"
    if module in ("model.py", "errors.py", "idn.py"):
        inner = sorted(m for m in _imports(path) if m.startswith("mta.") and m not in ("mta.model", "mta.errors"))
        assert inner == [], f"mta/{module} imports {inner}"
