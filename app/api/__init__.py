"""HTTP: routers, the auth dependency, and the one place that maps domain errors to problem+json."""
