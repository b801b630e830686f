"""mta.spool package."""
