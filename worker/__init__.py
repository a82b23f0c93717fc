"""genq worker: pulls jobs from Redis and runs them on an engine."""
