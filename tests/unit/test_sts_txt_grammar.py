"""RFC 8461 §3.1 TXT grammar at the end of a record (issue 10 item 5): pure parser tests.

    sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
    sts-field-delim = *WSP ";" *WSP

Whitespace exists in the grammar only inside a delimiter, i.e. next to a ";".
"""

from __future__ import annotations

import pytest

from mta.errors import StsRecordError
from mta.sts.policy import parse_txt_record, select_txt_record


@pytest.mark.parametrize("text", ["v=STSv1; id=abc ", "v=STSv1; id=abc\t", "v=STSv1; id=1; ext=x  ",
                                  "v=STSv1;id=abc \t"])
def test_issue10_item5_sts_12_trailing_whitespace_without_delimiter_is_invalid(text: str) -> None:
    """Issue 10 item 5 [DECISION]: `v=STSv1; id=abc ` is outside the ABNF (whitespace only in
    a delimiter, which needs a ";") -> syntactically invalid -> no usable record (STS-12)."""
    with pytest.raises(StsRecordError):
        parse_txt_record(text)
    with pytest.raises(StsRecordError):
        select_txt_record([text])


@pytest.mark.parametrize("text", ["v=STSv1; id=abc;", "v=STSv1; id=abc; ", "v=STSv1; id=abc ;",
                                  "v=STSv1; id=abc \t; \t", "v=STSv1; id=abc ; ext=x"])
def test_issue10_item5_sts_18_whitespace_inside_a_delimiter_stays_valid(text: str) -> None:
    """Issue 10 item 5 (the other side): spaces/tabs next to a ";" are a delimiter (STS-18)."""
    assert parse_txt_record(text).id == "abc"
