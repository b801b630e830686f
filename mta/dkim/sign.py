"""DKIM-Signature computation (RFC 6376 §3.7, §5; RFC 8463): relaxed/relaxed, no l=, t= set.

Rules:
- Canonicalisation is relaxed/relaxed (DKIM-2), written here from RFC 6376 §3.4.2 (headers) and
  §3.4.4 (body): it is a few lines, and the tests verify our signatures with dkimpy, an
  independent implementation, so a mistake here cannot hide behind shared code.
- `h=` lists each configured header once per instance present, plus one more for the oversigned
  ones (an oversigned header absent from the message is listed once, which signs its absence):
  nobody can add such a header after signing without breaking the signature (DKIM-1). From is
  always signed (RFC 6376 §5.4).
- rsa-sha256 signs the header hash input with RSASSA-PKCS1-v1_5/SHA-256; ed25519-sha256 signs
  the SHA-256 digest of it with PureEdDSA (RFC 8463 §3). `cryptography` does the arithmetic
  (0.3 ms per RSA-2048 signature here; dkimpy's pure-Python RSA takes ~15 ms).
- The new header fields go first, before every existing one (DKIM-7: we sign what we send, and
  nothing signed changes afterwards).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from mta.dkim.keys import LoadedKey

_WSP_RUN = re.compile(rb"[ \t]+")
_TRAILING_WSP = re.compile(rb"[ \t]+\r\n")
_LINE_WIDTH = 78


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(header fields as (raw name, raw value with folding, without the final CRLF), body).

    Lines that are neither a field nor a continuation are not header fields and are never
    selected. A message starting with an empty line has no header section."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 4 :])
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b"\r\n" + line
            continue
        name, colon, value = line.partition(b":")
        if colon and name and b" " not in name.strip() and b"\t" not in name.strip():
            fields.append([name, value])
        else:
            fields.append([b"", line])  # not a field: kept for positions, never matches a name
    return [(n, v) for n, v in fields], body


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2: lower-case name, unfold, runs of WSP to one SP, no WSP around the colon or at the end."""
    if b"\t" in value or b"  " in value or b"\r\n" in value:  # the common single-spaced field skips the regex
        value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b""))
    return name.strip(b" \t").lower() + b":" + value.strip(b" ")


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: no WSP at line ends, runs of WSP to one SP, no empty lines at the end;
    a non-empty body ends with CRLF, an empty one is empty."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if b"\t" in body or b"  " in body or b" \r\n" in body:  # most bodies need neither regex
        body = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", body))
        body = body.replace(b" \r\n", b"\r\n")
    while body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    return b"" if body == b"\r\n" else body


def _lowered(fields: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """Each field's name in lower case ("" for lines that are not fields)."""
    return [n.strip(b" \t").decode("ascii", "replace").lower() if n else "" for n, _ in fields]


def signed_names(fields: Sequence[tuple[bytes, bytes]], headers: Sequence[str], oversign: Sequence[str],
                 lowered: Sequence[str] | None = None) -> list[str]:
    """The `h=` list (lower-case): every instance of each configured header, plus one for oversigned ones."""
    present: dict[str, int] = {}
    for key in lowered if lowered is not None else _lowered(fields):
        if key:
            present[key] = present.get(key, 0) + 1
    over = {h.lower() for h in oversign}
    out: list[str] = []
    for name in dict.fromkeys(["from", *(h.lower() for h in headers)]):  # de-duplicated, configured order
        out.extend([name] * (present.get(name, 0) + (name in over)))
    if "from" not in out:
        out.append("from")  # RFC 6376 §5.4: From MUST be signed, even (if ever) when absent
    return out


def _select(fields: Sequence[tuple[bytes, bytes]], names: Sequence[str], lowered: Sequence[str]) -> list[bytes]:
    """RFC 6376 §5.4.2: the n-th use of a name in h= takes its n-th instance from the bottom;
    returns those fields canonicalised, each with its CRLF."""
    bottom_up: dict[str, list[int]] = {}
    for i in range(len(fields) - 1, -1, -1):
        if lowered[i]:
            bottom_up.setdefault(lowered[i], []).append(i)
    used: dict[str, int] = {}
    out: list[bytes] = []
    for name in names:
        skip = used.get(name, 0)
        used[name] = skip + 1
        instances = bottom_up.get(name, ())
        if skip < len(instances):
            name_bytes, value = fields[instances[skip]]
            out.append(relaxed_header(name_bytes, value) + b"\r\n")
    return out


def _fold(tokens: Sequence[str], start: str) -> str:
    """Join tag tokens into folded lines of at most _LINE_WIDTH; tokens starting with ':' continue h=."""
    lines = [start]
    for tok in tokens:
        glue = "" if tok.startswith(":") else " "
        if len(lines[-1]) + len(glue) + len(tok) > _LINE_WIDTH:
            lines.append("\t" + tok)
        else:
            lines[-1] += glue + tok
    return "\r\n".join(lines)


def signature_field(key: LoadedKey, hashed_fields: bytes, body_hash: bytes, names: Sequence[str],
                    now: float) -> bytes:
    """One complete `DKIM-Signature:` field (with CRLF) over the canonical signed fields and the body hash."""
    h_tokens = [f"h={names[0]}"] + [f":{n}" for n in names[1:]]
    h_tokens[-1] += ";"
    tokens = ["v=1;", f"a={key.algorithm};", "c=relaxed/relaxed;", f"d={key.domain};", f"s={key.selector};",
              f"t={int(now)};", *h_tokens, f"bh={base64.b64encode(body_hash).decode('ascii')};", "b="]
    unsigned = _fold(tokens, "DKIM-Signature:").encode("ascii")
    # The signed fields, then the signature field itself, with an empty b=, and without a final CRLF (RFC 6376 §3.7).
    name, _, value = unsigned.partition(b":")
    hashed = hashed_fields + relaxed_header(name, value)
    if isinstance(key.private, ed25519.Ed25519PrivateKey):
        signature = key.private.sign(hashlib.sha256(hashed).digest())
    else:
        signature = key.private.sign(hashed, padding.PKCS1v15(), hashes.SHA256())
    b64 = base64.b64encode(signature).decode("ascii")
    last = unsigned.rsplit(b"\r\n", 1)[-1]
    room = max(8, _LINE_WIDTH - len(last))
    chunks = [b64[:room]] + [b64[i : i + _LINE_WIDTH - 1] for i in range(room, len(b64), _LINE_WIDTH - 1)]
    return unsigned + "\r\n\t".join(chunks).encode("ascii") + b"\r\n"


def sign(message: bytes, keys: Sequence[LoadedKey], *, headers: Sequence[str], oversign: Sequence[str],
         now: float, split: tuple[list[tuple[bytes, bytes]], bytes] | None = None) -> bytes:
    """`message` (CRLF line ends) with one DKIM-Signature per key in front; unchanged when `keys` is empty.
    `split`: split_message(message), when the caller has it already."""
    if not keys:
        return message
    fields, body = split or split_message(message)
    body_hash = hashlib.sha256(relaxed_body(body)).digest()
    lowered = _lowered(fields)
    names = signed_names(fields, headers, oversign, lowered)
    hashed_fields = b"".join(_select(fields, names, lowered))  # the same for every key
    return b"".join(signature_field(k, hashed_fields, body_hash, names, now) for k in keys) + message
