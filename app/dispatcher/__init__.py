"""The outgoing dispatcher (issue #12): outbox, batch engine, rate bucket, credentials."""
