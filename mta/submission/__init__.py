"""mta.submission package."""
