"""The opt-in draft-ietf-uta-mta-sts-03 dialect (checklist section 8, SEED-S1..S6).

Rule: the draft's record and JSON policy are read into the same `StsRecord` and `Policy` values
as RFC 8461 ones, then matched, cached and applied by the RFC rules (SEED-S4). Only the syntax
differs: a TXT record at `mta-sts.<domain>` (SEED-1) with case-insensitive `v`/`id` and spaces
allowed around `=` (SEED-2/3), and a JSON policy at `/.well-known/mta-sts.json` (SEED-6/7)
whose `report` mode maps to `testing` (SEED-8). Where the draft was silent we are strict (SEED-S3):
duplicate JSON keys are rejected, `mx` must be a non-empty array of valid patterns (SEED-9,
SEED-12), and `max_age` is capped at the RFC's one year (SEED-10).

Which dialect wins (SEED-S2: an RFC policy always does) is the caller's decision.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from mta.errors import StsPolicyError, StsRecordError
from mta.sts.policy import MAX_AGE_CAP, Policy, StsRecord, parse_mx_pattern

DIALECT = "draft03"
DRAFT_TXT_LABEL = "mta-sts"  # SEED-1: no underscore (the same name as the policy web host)
DRAFT_POLICY_PATH = "/.well-known/mta-sts.json"  # SEED-6

# SEED-2/3: `v` and `id` are plain ABNF strings (case-insensitive), `STSv1` is case-sensitive;
# spaces/tabs around "=" and around the ";" between the fields; one optional ";" after the id.
_DRAFT_PREFIX = re.compile(r"[vV][ \t]*=[ \t]*STSv1[ \t]*;")
_DRAFT_RECORD = re.compile(r"[vV][ \t]*=[ \t]*STSv1[ \t]*;[ \t]*[iI][dD][ \t]*=[ \t]*([A-Za-z0-9]{1,32});?")
_DIGITS = re.compile(r"[0-9]+")
_MODES = {"report": "testing", "enforce": "enforce"}  # SEED-8 / SEED-S3


def parse_draft_txt(text: str) -> StsRecord:
    """Parse one draft-03 TXT record (`v=STSv1; id=...`). Raises StsRecordError."""
    m = _DRAFT_RECORD.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise StsRecordError("not a draft-03 v=STSv1; id=... record")
    return StsRecord(m.group(1))


def is_draft_record(text: str) -> bool:
    """Whether a TXT record counts as a draft-03 STS record at all (SEED-5)."""
    return isinstance(text, str) and _DRAFT_PREFIX.match(text) is not None


def select_draft_txt(texts: Sequence[str]) -> StsRecord:
    """Exactly one record starting `v=STSv1;` (draft spelling) must exist (SEED-5)."""
    candidates = [t for t in texts if is_draft_record(t)]
    if len(candidates) != 1:
        raise StsRecordError(f"{len(candidates)} draft-03 v=STSv1 records")
    return parse_draft_txt(candidates[0])


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"duplicate key {key!r}")  # SEED-S3 / I-JSON
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _max_age(value: Any) -> int:
    """A non-negative integer, as a JSON number or a numeric string (SEED-7/10), capped."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, MAX_AGE_CAP)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        significant = value.lstrip("0")
        # Long digit strings would exceed the cap anyway; don't feed them to int().
        return MAX_AGE_CAP if len(significant) > 10 else min(int(value), MAX_AGE_CAP)
    raise StsPolicyError("max_age must be a non-negative integer")


def parse_draft_policy(body: bytes) -> Policy:
    """Parse a draft-03 JSON policy into a `Policy` with dialect "draft03". Raises StsPolicyError only."""
    try:
        text = bytes(body).decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (UnicodeError, TypeError, ValueError, RecursionError) as exc:
        raise StsPolicyError(f"policy is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise StsPolicyError("policy is not a JSON object")
    if doc.get("version") != "STSv1":
        raise StsPolicyError("version must be STSv1")
    mode = _MODES.get(doc["mode"]) if isinstance(doc.get("mode"), str) else None
    if mode is None:
        raise StsPolicyError("mode must be report or enforce")  # SEED-8
    if "max_age" not in doc:
        raise StsPolicyError("policy has no max_age")
    max_age = _max_age(doc["max_age"])
    mx = doc.get("mx")
    if not isinstance(mx, list) or not mx or not all(isinstance(p, str) for p in mx):
        raise StsPolicyError("mx must be a non-empty array of strings")  # SEED-9
    return Policy(mode, tuple(parse_mx_pattern(p) for p in mx), max_age, DIALECT)
