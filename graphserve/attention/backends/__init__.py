"""Attention backends: `base` defines the interface, `registry` picks one per platform (lazily)."""
