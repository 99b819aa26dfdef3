"""Attention backends (ABC, registry, torch reference), their metadata, and the per-step forward context."""
