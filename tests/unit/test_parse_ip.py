"""mta.model.parse_ip: the shortcut for host names gives ipaddress.ip_address's verdict on every text."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mta.model import parse_ip


def _reference(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_TEXT = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF.:%xyz-", max_size=45),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda ip: ip.exploded),
    st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}", fullmatch=True),
    st.text(max_size=20),
)


@settings(max_examples=4000, deadline=None)
@given(_TEXT)
@example("mx.plain.test")
@example("127.0.0.1")
@example("1.2.3")
@example("01.2.3.4")
@example("::1")
@example("fe80::1%eth0")
@example("::ffff:1.2.3.4")
@example("١٢٧.0.0.1")  # Arabic-Indic digits: isdigit() is true, ipaddress still refuses
@example("")
def test_parse_ip_agrees_with_ipaddress(text: str) -> None:
    assert parse_ip(text) == _reference(text)
