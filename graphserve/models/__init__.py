"""Model implementations, their registry, and the config/weight loaders."""
