"""Regenerate and check the "tests" column of docs/conformance.md from the test suite.

`python tools/conformance.py` (= `make conformance`) collects the suite with pytest (nothing
runs), maps every test to the requirement ids it names, and rewrites only the last column of each
row of docs/conformance.md; every other column is hand-written and kept as it is.
`--check` writes nothing and exits 1 listing every problem: a test naming an id without a row,
an implemented row without a test, a duplicate row, an unknown status, or a stale tests column.

A test names an id in three ways (pytest collection sees all of them, parametrized rows included):
- a marker `@pytest.mark.req("STS-68", ...)` (also on a class, a module's `pytestmark` or a
  `pytest.param(..., marks=...)`); every marker id must have a row;
- its function name: `test_sts_31_...`, `test_rpt_1_18_23_...` (several numbers continue the
  same prefix), `test_dsn_5_dsn_13_...`; only prefixes that already have rows are recognised;
- a parametrize id such as `"RPT-4 two records"` (known prefixes only).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC = Path("docs/conformance.md")
STATUSES = ("implemented", "not implemented", "not applicable")
ID_RE = re.compile(r"^([A-Z][A-Z0-9]*)-(S?[0-9]+)$")
# A row: first cell an id, six cells in all. Cells are split on pipes not escaped as "\|".
CELL_SPLIT = re.compile(r"(?<!\\)\|")
COLUMNS = 6


@dataclass(frozen=True)
class Row:
    line_no: int  # 0-based index into the document's lines
    req_id: str
    status: str
    tests: str


@dataclass(frozen=True)
class CaseRef:
    """One collected test function (parametrized cases folded into their function)."""

    location: str  # "test_sts_fetch::test_sts_31_redirect_not_followed"
    marker_ids: frozenset[str]
    text_ids: frozenset[str]  # from the function name and parametrize ids (known prefixes only)


def split_cells(line: str) -> list[str] | None:
    stripped = line.strip()
    if not stripped.startswith("|") or not stripped.endswith("|"):
        return None
    return [c.strip() for c in CELL_SPLIT.split(stripped[1:-1])]


def parse_rows(text: str) -> tuple[list[Row], list[str]]:
    """The requirement rows of the document, and problems with their shape."""
    rows: list[Row] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines()):
        cells = split_cells(line)
        if not cells or not ID_RE.match(cells[0]):
            continue
        if len(cells) != COLUMNS:
            problems.append(f"line {n + 1}: row {cells[0]} has {len(cells)} cells, expected {COLUMNS}")
            continue
        rows.append(Row(n, cells[0], cells[4], cells[5]))
    return rows, problems


def prefixes_of(ids: Iterable[str]) -> frozenset[str]:
    return frozenset(m.group(1) for i in ids if (m := ID_RE.match(i)))


def ids_in_name(name: str, prefixes: frozenset[str], known: frozenset[str] | None = None) -> set[str]:
    """`test_sts_67_72_id_1_9_mx` -> {STS-67, STS-72, ID-1, ID-9}: a known prefix followed by one
    or more numbers (SEED also takes `s3`); a prefix not followed by a number names nothing."""
    found: set[str] = set()
    words = name.lower().split("_")
    i = 0
    while i < len(words):
        prefix = words[i].upper()
        j = i + 1
        while prefix in prefixes and j < len(words) and re.fullmatch(r"s?[0-9]+", words[j]):
            req_id = f"{prefix}-{words[j].upper()}"
            # Only the first number is taken on trust (so a typo shows up as "no row"); later ones
            # must be known ids, so `test_smtp_18_452_...` names SMTP-18 and not "SMTP-452".
            if j > i + 1 and known is not None and req_id not in known:
                break
            found.add(req_id)
            j += 1
        i = j
    return found


def ids_in_text(text: str, prefixes: frozenset[str]) -> set[str]:
    """Ids written as such ("RPT-4 two records") in a parametrize id; known prefixes only, so
    "UTF-8" or "SHA-256" are not taken for requirement ids."""
    return {f"{p}-{n}" for p, n in re.findall(r"\b([A-Z][A-Z0-9]*)-(S?[0-9]+)\b", text) if p in prefixes}


def locations_by_id(refs: Sequence[CaseRef]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for ref in refs:
        for req_id in ref.marker_ids | ref.text_ids:
            out.setdefault(req_id, set()).add(ref.location)
    return {k: sorted(v) for k, v in out.items()}


def render_tests(locations: Sequence[str]) -> str:
    return "<br>".join(f"`{loc}`" for loc in locations) if locations else "-"


def regenerate(text: str, by_id: Mapping[str, Sequence[str]]) -> str:
    """The document with only the tests column of each requirement row replaced."""
    lines = text.splitlines(keepends=True)
    rows, _ = parse_rows(text)
    for row in rows:
        line = lines[row.line_no]
        ending = line[len(line.rstrip("\r\n")):]
        cells = split_cells(line)
        assert cells is not None
        cells[5] = render_tests(by_id.get(row.req_id, []))
        lines[row.line_no] = "| " + " | ".join(cells) + " |" + ending
    return "".join(lines)


def check(text: str, refs: Sequence[CaseRef]) -> list[str]:
    """Every problem that makes the matrix disagree with the suite (empty list: consistent)."""
    rows, problems = parse_rows(text)
    known: dict[str, Row] = {}
    for row in rows:
        if row.req_id in known:
            problems.append(f"{row.req_id}: duplicate row")
        known[row.req_id] = row
        if row.status not in STATUSES:
            problems.append(f"{row.req_id}: status {row.status!r} is not one of {', '.join(STATUSES)}")
    by_id = locations_by_id(refs)
    for req_id, locations in sorted(by_id.items()):
        if req_id not in known:
            problems.append(f"{req_id}: named by {', '.join(locations)} but has no row")
    for row in rows:
        if row.status == "implemented" and not by_id.get(row.req_id):
            problems.append(f"{row.req_id}: marked implemented but no test names it")
    if regenerate(text, by_id) != text:
        problems.append(f"{DOC}: tests column is stale; run `make conformance`")
    return problems


def refs_from_items(items: Iterable[Any], known: frozenset[str]) -> list[CaseRef]:
    """Collected pytest items folded per test function, with the ids each one names."""
    prefixes = prefixes_of(known)
    folded: dict[str, tuple[set[str], set[str]]] = {}
    for item in items:
        func = getattr(item, "originalname", item.name)
        location = f"{Path(str(item.path)).stem}::{func}"
        markers, texts = folded.setdefault(location, (set(), set()))
        for mark in item.iter_markers("req"):
            markers.update(str(a) for a in mark.args)
        texts |= ids_in_name(func, prefixes, known)
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            texts |= ids_in_text(callspec.id, prefixes)
    return [CaseRef(loc, frozenset(m), frozenset(t)) for loc, (m, t) in sorted(folded.items())]


def collect(known: frozenset[str], test_paths: Sequence[str] = ("tests",)) -> list[CaseRef]:
    """Collect (not run) the suite with pytest and fold parametrized cases per function."""
    import pytest

    class Collector:
        def __init__(self) -> None:
            self.items: list[pytest.Item] = []

        def pytest_collection_finish(self, session: pytest.Session) -> None:
            self.items = list(session.items)

    collector = Collector()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *test_paths], plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise SystemExit(f"{out.getvalue()}\ntest collection failed ({code})")
    return refs_from_items(collector.items, known)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 on any problem")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    rows, _ = parse_rows(text)
    refs = collect(frozenset(r.req_id for r in rows))
    if args.check:
        problems = check(text, refs)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    DOC.write_text(regenerate(text, locations_by_id(refs)), encoding="utf-8")
    remaining = [p for p in check(DOC.read_text(encoding="utf-8"), refs) if "stale" not in p]
    for p in remaining:
        print(p, file=sys.stderr)
    return 1 if remaining else 0


if __name__ == "__main__":
    sys.exit(main())
