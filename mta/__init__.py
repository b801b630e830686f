"""mta: an outbound mail relay that enforces MTA-STS (RFC 8461)."""

__version__ = "0.1.0"
