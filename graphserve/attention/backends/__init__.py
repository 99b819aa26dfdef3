"""Attention backends: `base` defines the interface, `registry` names them (imported lazily), the platform
picks the default and `--attention-backend` another."""
