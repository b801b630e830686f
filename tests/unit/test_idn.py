"""One IDNA rule everywhere (issue 11 section 3): IDNA 2008 with UTS #46 through the `idna`
package for DNS queries, policy MX matching, TLS reports and DSNs alike."""

from __future__ import annotations

import dns.name
import pytest

from mta import idn
from mta.delivery.dsn import _hostname
from mta.dkim.select import _a_label as dkim_a_label
from mta.net.dns import to_ascii
from mta.sts.policy import mx_matches
from mta.tlsrpt.report import _a_label

# input -> IDNA 2008 (non-transitional) A-labels; the first two differ under IDNA 2003
CASES = {
    "faß.example": "xn--fa-hia.example",
    "mx.straße.example.": "mx.xn--strae-oqa.example",
    "Bücher.EXAMPLE": "xn--bcher-kva.example",
    "mx1.xn--bcher-kva.example": "mx1.xn--bcher-kva.example",
    "_mta-sts.bücher.example": "_mta-sts.xn--bcher-kva.example",
}


@pytest.mark.parametrize(("text", "expected"), list(CASES.items()))
def test_sts_5_id_2_one_idna_rule_in_dns_policy_report_and_dsn(text: str, expected: str) -> None:
    assert idn.to_ascii(text) == expected
    assert to_ascii(text) == expected  # DNS queries (STS-5)
    # dnspython's own IDNA 2008 codec agrees, so the queries are what they were before
    assert dns.name.from_text(text, idna_codec=dns.name.IDNA_2008_Practical).to_text(True).lower() == expected
    if not text.startswith("_"):
        assert mx_matches(text, expected)  # ID-2: compared in A-label form
        assert _a_label(text, "receiving-mx-hostname") == expected  # TLS reports
        assert _hostname(text, "reporting-mta") == expected  # DSNs
        assert dkim_a_label(text) == expected  # DKIM signing domains


def test_stdlib_idna_2003_codec_would_name_another_domain() -> None:
    """Why the stdlib codec is gone: IDNA 2003 maps ß to ss, a different registered domain."""
    assert "faß.example".encode("idna") == b"fass.example"
    assert idn.to_ascii("faß.example") == "xn--fa-hia.example"
    assert not mx_matches("faß.example", "fass.example")


@pytest.mark.parametrize("text", ["", ".", "a..example", "x" * 64 + ".example", "\u0300x.example"])
def test_idn_rejects_impossible_names(text: str) -> None:
    with pytest.raises(ValueError):
        idn.to_ascii(text)
