"""mta.delivery package."""
