"""Command-line flags of `sendmail`, parsed like sendmail's own getopt (pure).

Rule: the flags real callers send are understood (`-t`, `-f`/`-r`, `-F`, `-i`/`-oi`, `-bs`,
`-bp`, `-bm`), the harmless rest is accepted and ignored (`-o*`, `-B*`, `-N`, `-v`, `-m`), and
anything else is a usage error (exit 64): a flag we do not know might change what the caller
expects to happen, so we refuse rather than guess. Flags may be bundled (`-ti`) and take their
value attached (`-fuser@example.org`, `-FCronDaemon`) or as the next argument. Options end at
`--` or at the first argument that is not one (POSIX getopt); the rest are recipients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class UsageError(ValueError):
    """Bad command line (sysexits EX_USAGE)."""


@dataclass(frozen=True)
class Options:
    mode: str = "deliver"  # "deliver" (read a message) | "smtp" (-bs) | "queue" (-bp)
    extract: bool = False  # -t: recipients from To:/Cc:/Bcc:, added to the command line's
    sender: str | None = None  # -f / -r: envelope sender ("" = null sender)
    full_name: str | None = None  # -F: display name of a From: we add
    ignore_dots: bool = False  # -i / -oi: a lone "." line does not end the input
    verbose: bool = False  # -v: also print the `accepted` log line
    recipients: tuple[str, ...] = field(default=())


_VALUE_FLAGS = "frFNBo"  # take a value, attached or as the next argument
_MODES = {"s": "smtp", "p": "queue", "m": "deliver"}


def parse(argv: Sequence[str]) -> Options:
    """Options from `argv` (without the program name); UsageError names the offending flag."""
    values: dict[str, object] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            i -= 1
            break
        pos = 1
        while pos < len(arg):
            flag = arg[pos]
            pos += 1
            if flag in "tivm":
                if flag == "t":
                    values["extract"] = True
                elif flag == "i":
                    values["ignore_dots"] = True
                elif flag == "v":
                    values["verbose"] = True
                continue  # -m (me too) is what we do anyway
            if flag == "b":
                mode = arg[pos:]
                if mode not in _MODES:
                    raise UsageError(f"-b{mode}: unsupported mode (use -bm, -bs or -bp)")
                values["mode"] = _MODES[mode]
                break
            if flag in _VALUE_FLAGS:
                value = arg[pos:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"-{flag} needs a value")
                    value = argv[i]
                    i += 1
                if flag in "fr":
                    values["sender"] = _bare(value)
                elif flag == "F":
                    values["full_name"] = value
                elif flag == "o" and value == "i":
                    values["ignore_dots"] = True
                # -o<anything else>, -B<type>, -N<dsn>: accepted and ignored
                break
            raise UsageError(f"-{flag}: unknown option")
    recipients = tuple(argv[i:])
    return Options(recipients=recipients, **values)  # type: ignore[arg-type]


def _bare(address: str) -> str:
    """`<a@b>` -> `a@b`; `<>` -> `` (the null sender)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address
