"""Deliver: the durable queue (SQLite) of outputs per destination, and one worker per destination
that sends batches with backoff and dead letters; hands on nothing (the end of the flow)."""
