"""mta.testing's place in the package (issue 16): shipped code never needs it (KIT-5), and the suite's
old tests.support modules are the very same objects, not a second world (KIT-7)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mta

PACKAGE = Path(mta.__file__).resolve().parent


@pytest.mark.req("KIT-5")
def test_importing_all_of_mta_loads_neither_mta_testing_nor_its_extra() -> None:
    modules = sorted(
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
        if "testing" not in path.relative_to(PACKAGE).parts[:1] and path.stem != "__main__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('trustme', 'pytest', '_pytest')\n"
        "             or n.startswith('mta.testing'))\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.req("KIT-5")
def test_only_the_cli_command_imports_mta_testing_and_only_inside_a_function() -> None:
    """Layering: mta.testing may import the rest of mta, never the reverse; the one exception is the
    `mta sandbox` command, which loads it lazily (the CLI is the composition root above both)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[:2] == ("mta", "testing"):
            continue
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            uses_kit = any(n == "mta.testing" or n.startswith("mta.testing.") for n in names)
            if uses_kit and (id(node) in top_level or str(rel) != "mta/cli.py"):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


@pytest.mark.req("KIT-7")
def test_tests_support_modules_are_shims_over_mta_testing() -> None:
    from mta.testing import fake_dns, fake_mx, loop_thread, pki, policy_server, relay, world
    from tests.support import fake_dns as s_dns
    from tests.support import fake_mx as s_mx
    from tests.support import loop_thread as s_loop
    from tests.support import pki as s_pki
    from tests.support import policy_server as s_policy
    from tests.support import relay as s_relay
    from tests.support import world as s_world

    assert s_world.World is world.World and s_relay.RelayProcess is relay.RelayProcess
    assert s_dns.FakeDns is fake_dns.FakeDns and s_dns.Zone is fake_dns.Zone
    assert s_mx.FakeMx is fake_mx.FakeMx and s_mx.USER_UNKNOWN == fake_mx.USER_UNKNOWN
    assert s_pki.TestPki is pki.TestPki and s_loop.LoopThread is loop_thread.LoopThread
    assert s_policy.PolicyServer is policy_server.PolicyServer
    for shim in (s_dns, s_mx, s_loop, s_pki, s_policy, s_relay, s_world):
        code = [n for n in ast.parse(Path(shim.__file__).read_text()).body
                if not isinstance(n, ast.ImportFrom | ast.Expr)]
        assert code == [], f"{shim.__name__} has code of its own: one implementation lives in mta.testing"
