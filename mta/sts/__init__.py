"""mta.sts package."""
