"""Serving metrics: per-step stats from the engine, Prometheus collectors and the periodic log line."""
