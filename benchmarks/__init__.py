"""Reproducible measurements; each prints a table and writes a JSON result."""
