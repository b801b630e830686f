"""The operations endpoint of `mta serve`: Prometheus metrics, health, readiness and the queue API."""
