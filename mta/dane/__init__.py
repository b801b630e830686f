"""DANE for SMTP (RFC 7672): TLSA records, certificate matching and per-MX verdicts (pure), and the lookup adapter."""
