"""mta.net package."""
