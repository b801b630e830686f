"""The exception hierarchy of mta; errors from libraries are mapped at the edges.

    MtaError
    ├── ConfigError            bad configuration; message names the key path
    ├── SpoolError             disk trouble in the spool (full, unwritable)
    │   └── CorruptEntry       a meta file that cannot be parsed
    ├── DnsError               a lookup failed (mapped in mta.net.dns)
    │   ├── DnsTemporaryError  SERVFAIL, timeout, refused: try again later
    │   └── DnsPermanentError  NXDOMAIN and other authoritative negatives
    ├── StsError               MTA-STS trouble
    │   ├── StsRecordError     the _mta-sts TXT record set is unusable (pure parser)
    │   ├── StsPolicyError     the policy body is invalid (pure parser)
    │   └── StsFetchError      the HTTPS fetch failed (mapped in mta.sts.fetch)
    └── DeliveryError          carries an SmtpReply
        ├── TransientDeliveryError   4xx or connection trouble
        │   └── HostUnreachableError refused / timed out before any SMTP reply (SMTP-37)
        └── PermanentDeliveryError   5xx

Temporary versus permanent is decided once, from the reply code (`error_for_reply`).
"""

from __future__ import annotations

from mta.model import SmtpReply


class MtaError(Exception):
    """Base of every error mta raises on purpose."""


class ConfigError(MtaError):
    """Invalid configuration: the message is one line naming the file and key."""


class SpoolError(MtaError):
    """The spool could not store or update a message."""


class CorruptEntry(SpoolError):
    """A spool meta file could not be parsed."""


class DnsError(MtaError):
    """A DNS lookup failed."""


class DnsTemporaryError(DnsError):
    """SERVFAIL, timeout or no answer: worth retrying later."""


class DnsPermanentError(DnsError):
    """An authoritative negative answer (NXDOMAIN)."""


class StsError(MtaError):
    """MTA-STS discovery or validation failed."""

    #: TLS-RPT result type (RFC 8460 §4.3) that this failure is reported as.
    result_type = "validation-failure"


class StsRecordError(StsError):
    """The `_mta-sts` TXT record set yields no usable record (RFC 8461 §3.1)."""


class StsPolicyError(StsError):
    """The policy body is invalid (RFC 8461 §3.2)."""

    result_type = "sts-policy-invalid"


class StsFetchError(StsError):
    """The policy could not be fetched over HTTPS (RFC 8461 §3.3)."""

    result_type = "sts-policy-fetch-error"

    def __init__(self, message: str, result_type: str = "sts-policy-fetch-error") -> None:
        super().__init__(message)
        self.result_type = result_type


class DeliveryError(MtaError):
    """A delivery step failed with an SMTP reply (real or synthesised)."""

    def __init__(self, reply: SmtpReply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class TransientDeliveryError(DeliveryError):
    """A 4xx reply or connection trouble."""


class HostUnreachableError(TransientDeliveryError):
    """The host never became an SMTP peer: connection refused, connect or greeting timeout,
    no route. Such a host is skipped for a while across messages (SMTP-37)."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx reply."""


def error_for_reply(reply: SmtpReply) -> DeliveryError:
    """The one place where a reply code decides temporary versus permanent (SMTP-19)."""
    if reply.code >= 500:
        return PermanentDeliveryError(reply)
    return TransientDeliveryError(reply)
