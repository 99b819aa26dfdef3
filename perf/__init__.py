"""Benchmarks (not tests): each script prints and writes a JSON record."""
