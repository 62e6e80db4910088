"""Device-side services: workers, file server."""
