"""mta.tlsrpt package."""
