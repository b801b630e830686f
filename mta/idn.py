"""One IDNA rule for every domain name mta handles (issue 11 section 3): IDNA 2008 (RFC 5891)
with UTS #46 mapping, non-transitional, through the `idna` package - the rule of RFC 8461 §3.2
and RFC 8460 (A-labels), and of dnspython's own IDNA 2008 codec.

Python's built-in "idna" codec is IDNA 2003, which maps "ß" to "ss" ("faß.de" -> "fass.de", a
different domain from IDNA 2008's "xn--fa-hia.de"): a policy match, a DNS query, a report and a
DSN could otherwise name different hosts for one input. It is not used anywhere.

Labels that are already ASCII pass through lower-cased and unchecked: DNS names such as
`_mta-sts.example` or `_smtp._tls.example` carry underscores, which IDNA would refuse.
Pure: no I/O.
"""

from __future__ import annotations

import idna

MAX_LABEL = 63  # octets (RFC 1035 §2.3.4)
MAX_NAME = 253  # octets of text form without the final dot


def to_ascii(name: str) -> str:
    """`name` as lower-case A-labels without the trailing dot; ValueError if it cannot be one."""
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise ValueError("empty name")
    if not text.isascii():
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False)
            text = ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                            for label in text.split("."))
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"not a valid internationalised name ({exc})") from None
    labels = text.lower().split(".")
    if any(not label for label in labels):
        raise ValueError("empty label")
    if any(len(label) > MAX_LABEL for label in labels):
        raise ValueError(f"label longer than {MAX_LABEL} octets")
    if len(text) > MAX_NAME:
        raise ValueError(f"name longer than {MAX_NAME} octets")
    return ".".join(labels)
