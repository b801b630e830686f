"""The conformance matrix (docs/conformance.md) agrees with the suite, and its generator's rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.conformance import (
    DOC,
    CaseRef,
    check,
    ids_in_name,
    ids_in_text,
    locations_by_id,
    parse_rows,
    refs_from_items,
    regenerate,
)

ROOT = Path(__file__).resolve().parents[2]
PREFIXES = frozenset({"STS", "RPT", "SMTP", "NMX", "DSN", "ID", "SEED", "DLV"})
KNOWN = frozenset({"STS-31", "STS-67", "STS-72", "ID-1", "ID-9", "RPT-1", "RPT-18", "RPT-23", "SMTP-18",
                   "DSN-5", "DSN-13", "SEED-13", "SEED-S3", "NMX-1", "NMX-4"})

HEADER = "| id | source | requirement | decision | status | tests |\n|---|---|---|---|---|---|\n"


def doc(*rows: str) -> str:
    return "# m\n\n" + HEADER + "".join(r + "\n" for r in rows) + "\ntrailing prose | not a row |\n"


def ref(location: str, markers: set[str] | None = None, texts: set[str] | None = None) -> CaseRef:
    return CaseRef(location, frozenset(markers or ()), frozenset(texts or ()))


def _whole_suite_collected(session: pytest.Session) -> bool:
    """True when this run collected every test (as `make test` does), so its items can be used
    instead of collecting the suite again in a subprocess (seconds on a loaded machine)."""
    opt = session.config.option
    if opt.keyword or opt.markexpr or getattr(opt, "deselect", None) or getattr(opt, "lf", False):
        return False
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or reporter.stats.get("deselected"):
        return False
    files = {Path(str(item.path)).resolve() for item in session.items}
    return {p.resolve() for p in (ROOT / "tests").rglob("test_*.py")} <= files


def test_matrix_matches_the_suite(request: pytest.FixtureRequest) -> None:
    """CI guard: every implemented row has a test, every id a test names has a row, the tests
    column is current (`make conformance`)."""
    if _whole_suite_collected(request.session):
        text = (ROOT / DOC).read_text(encoding="utf-8")
        rows, _ = parse_rows(text)
        problems = check(text, refs_from_items(request.session.items, frozenset(r.req_id for r in rows)))
        assert problems == [], "\n".join(problems)
        return
    out = subprocess.run([sys.executable, "tools/conformance.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_links_the_matrix_and_names_nothing_outside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/conformance.md" in readme
    assert "shared/" not in readme and "/work/" not in readme


def test_ids_in_names() -> None:
    assert ids_in_name("test_sts_31_redirect_not_followed", PREFIXES, KNOWN) == {"STS-31"}
    assert ids_in_name("test_sts_67_72_id_1_9_mx_matches", PREFIXES, KNOWN) == {"STS-67", "STS-72", "ID-1", "ID-9"}
    assert ids_in_name("test_rpt_1_18_23_mailto", PREFIXES, KNOWN) == {"RPT-1", "RPT-18", "RPT-23"}
    assert ids_in_name("test_dsn_5_dsn_13_delay_warning", PREFIXES, KNOWN) == {"DSN-5", "DSN-13"}
    assert ids_in_name("test_seed_13_s3_duplicate_keys", PREFIXES, KNOWN) == {"SEED-13", "SEED-S3"}
    # Numbers after the first must be known ids: a reply code is not SMTP-452.
    assert ids_in_name("test_smtp_18_452_and_552_to_rcpt", PREFIXES, KNOWN) == {"SMTP-18"}
    assert ids_in_name("test_nmx_1_null_mx_bounces_556_5_1_10", PREFIXES, KNOWN) == {"NMX-1"}
    # The first number is taken as written, so a typo surfaces as an id without a row.
    assert ids_in_name("test_sts_999_typo", PREFIXES, KNOWN) == {"STS-999"}
    # A prefix word without a number, or an unknown prefix, names nothing.
    assert ids_in_name("test_sts_64_failed_id_and_dialect", PREFIXES, KNOWN) == {"STS-64"}
    assert ids_in_name("test_o_dns_answers_over_udp", PREFIXES, KNOWN) == set()
    assert ids_in_name("test_dlv_1_deadline", PREFIXES, KNOWN) == {"DLV-1"}


def test_ids_in_parametrize_ids_need_a_known_prefix() -> None:
    assert ids_in_text("RPT-4 two records, one broken", PREFIXES) == {"RPT-4"}
    assert ids_in_text("STS-50-mx*.example.com", PREFIXES) == {"STS-50"}
    assert ids_in_text("UTF-8 body and SHA-256", PREFIXES) == set()


def test_regenerate_rewrites_only_the_tests_column() -> None:
    text = doc("| STS-31 | RFC 8461 §3.3 | no redirects | - | implemented | stale |",
               "| STS-29 | RFC 8461 §3.3 | revocation | not checked \\| MAY | not implemented | - |")
    refs = [ref("test_b::test_sts_31_x", texts={"STS-31"}), ref("test_a::test_y", markers={"STS-31"})]
    out = regenerate(text, locations_by_id(refs))
    assert "| no redirects | - | implemented | `test_a::test_y`<br>`test_b::test_sts_31_x` |" in out
    assert "| not checked \\| MAY | not implemented | - |" in out
    assert out.endswith("\ntrailing prose | not a row |\n")
    assert check(out, refs) == []
    assert regenerate(out, locations_by_id(refs)) == out


def test_check_reports_every_kind_of_drift() -> None:
    text = doc("| STS-31 | s | r | - | implemented | `old::test` |",
               "| STS-29 | s | r | - | done | - |",
               "| STS-29 | s | r | - | not implemented | - |",
               "| STS-30 | s | r | implemented | - |")
    refs = [ref("test_a::test_z", markers={"XYZ-1"})]
    problems = check(text, refs)
    assert "STS-29: duplicate row" in problems
    assert any(p.startswith("STS-29: status 'done'") for p in problems)
    assert "STS-31: marked implemented but no test names it" in problems
    assert "XYZ-1: named by test_a::test_z but has no row" in problems
    assert any("STS-30 has 5 cells" in p for p in problems)
    assert any("stale" in p for p in problems)


def test_rows_are_found_only_in_tables() -> None:
    rows, problems = parse_rows(doc("| SEED-S3 | s | r | - | implemented | - |") + "text STS-1 in prose\n")
    assert [r.req_id for r in rows] == ["SEED-S3"] and problems == []
