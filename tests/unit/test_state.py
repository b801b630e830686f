"""The recipient state table (spool/state.py), row by row, and retry timing (SMTP-34/35)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.errors import CorruptEntry
from mta.model import RecipientStatus as S
from mta.model import SmtpReply
from mta.spool import state

OK = SmtpReply(250, "ok", "2.0.0")
SOFT = SmtpReply(451, "try later", "4.3.0")
HARD = SmtpReply(550, "no such user", "5.1.1")
INTERVALS = (1.0, 2.0)


def run(r: state.Recipient, kind: str, reply: SmtpReply, now: float = 100.0, created: float = 0.0,
        lifetime: float = 1000.0) -> state.Recipient:
    return state.apply(r, state.Outcome(kind, reply, remote_mta="mx.test"), now=now, created=created,
                       intervals=INTERVALS, lifetime=lifetime, rng=random.Random(1))


@pytest.mark.parametrize(("start", "kind", "end"), [
    (S.QUEUED, "delivered", S.DELIVERED), (S.QUEUED, "transient", S.DEFERRED), (S.QUEUED, "permanent", S.BOUNCED),
    (S.DEFERRED, "delivered", S.DELIVERED), (S.DEFERRED, "transient", S.DEFERRED),
    (S.DEFERRED, "permanent", S.BOUNCED),
])
def test_table_rows(start: S, kind: str, end: S) -> None:
    reply = {"delivered": OK, "transient": SOFT, "permanent": HARD}[kind]
    new = run(state.Recipient("a@b.test", status=start, attempts=2), kind, reply)
    assert new.status is end
    assert new.attempts == 3
    assert new.last_attempt == 100.0
    assert new.status_code == reply.status


@pytest.mark.parametrize("final", [S.DELIVERED, S.BOUNCED])
@pytest.mark.parametrize("kind", ["delivered", "transient", "permanent"])
def test_final_recipients_take_no_outcome(final: S, kind: str) -> None:
    with pytest.raises(state.InvalidTransition):
        run(state.Recipient("a@b.test", status=final), kind, OK)


def test_smtp_34_retry_intervals_last_repeats() -> None:
    r = state.Recipient("a@b.test")
    delays = []
    for i in range(4):
        r = run(r, "transient", SOFT, now=100.0 + i)
        delays.append(r.next_attempt - (100.0 + i))
    assert 1.0 <= delays[0] <= 1.1
    assert all(2.0 <= d <= 2.2 for d in delays[1:])
    assert r.last_error == "451 4.3.0 try later"


def test_smtp_35_lifetime_turns_transient_into_bounce_with_last_error() -> None:
    r = run(state.Recipient("a@b.test", status=S.DEFERRED), "transient", SOFT, now=1000.0, created=0.0, lifetime=1000)
    assert r.status is S.BOUNCED
    assert r.status_code == "5.4.7"
    assert "try later" in r.last_error
    assert "queue lifetime" in r.reason


def test_permanent_keeps_remote_status() -> None:
    r = run(state.Recipient("a@b.test"), "permanent", HARD)
    assert (r.status, r.status_code, r.remote_mta, r.next_attempt) == (S.BOUNCED, "5.1.1", "mx.test", 0.0)


def test_meta_json_round_trip_and_next_due() -> None:
    meta = state.MessageMeta(id="X1", sender="s@a.test", created=5.0, size=10, recipients=(
        state.Recipient("a@b.test", next_attempt=9.0), state.Recipient("c@d.test", status=S.DEFERRED, next_attempt=7.0),
        state.Recipient("e@f.test", status=S.DELIVERED)))
    again = state.MessageMeta.from_json(meta.to_json())
    assert again == meta
    assert meta.next_due() == 7.0
    assert not meta.done
    flushed = state.flush(meta, 3.0)
    assert [r.next_attempt for r in flushed.recipients] == [9.0, 3.0, 0.0]


@pytest.mark.parametrize("data", [None, [], {"schema": 99}, {"schema": 1, "id": "x"},
                                  {"schema": 1, "id": "x", "sender": "", "created": 0, "size": 0, "recipients": []},
                                  {"schema": 1, "id": "x", "sender": "", "created": 0, "size": 0,
                                   "recipients": [{"address": "a", "status": "lost"}]}])
def test_corrupt_meta_is_a_typed_error(data: object) -> None:
    with pytest.raises(CorruptEntry):
        state.MessageMeta.from_json(data)


def test_smtp_39_owed_notice_keeps_message_until_dsn_queued() -> None:
    bounced = state.Recipient("a@b.test", status=S.BOUNCED)
    meta = state.MessageMeta(id="X", sender="s@a.test", created=0.0, size=1, recipients=(bounced,))
    assert meta.owed_notices == [bounced] and not meta.done and meta.next_due() == 0.0
    from dataclasses import replace
    told = replace(meta, recipients=(replace(bounced, notified=True),))
    assert told.owed_notices == [] and told.done and told.next_due() is None
    # SMTP-40: nothing is owed for a null sender, nor for our own DSNs
    assert replace(meta, sender="").done and replace(meta, kind="dsn").done


def _asdict_reference(meta: state.MessageMeta) -> dict[str, object]:
    """What to_json returned when it was dataclasses.asdict plus the schema and status values."""
    data = dataclasses.asdict(meta)
    data["schema"] = state.SCHEMA
    for r in data["recipients"]:
        r["status"] = r["status"].value
    return data


_RECIPIENTS = st.builds(
    state.Recipient, address=st.text(max_size=10), status=st.sampled_from(list(S)), attempts=st.integers(0, 9),
    last_error=st.text(max_size=10), next_attempt=st.floats(allow_nan=False),
    remote_mta=st.none() | st.text(max_size=5), notified=st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.builds(state.MessageMeta, id=st.text(max_size=8), sender=st.text(max_size=8),
                 created=st.floats(allow_nan=False), size=st.integers(0, 10**9),
                 recipients=st.lists(_RECIPIENTS, min_size=1, max_size=4).map(tuple),
                 held=st.booleans(), client=st.text(max_size=8),
                 extra=st.dictionaries(st.text(max_size=4), st.lists(st.integers(), max_size=3), max_size=2)))
def test_to_json_is_asdicts_result_and_shares_nothing(meta: state.MessageMeta) -> None:
    data = meta.to_json()
    assert data == _asdict_reference(meta)
    assert json.dumps(data, sort_keys=True) == json.dumps(_asdict_reference(meta), sort_keys=True)
    for value in data["extra"].values():  # a copy: changing the result leaves the message alone
        value.append(-1)
    assert meta.to_json() == _asdict_reference(meta)
