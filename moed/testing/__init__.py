"""Fixtures: tiny checkpoints built from a seed (the tests, and the built-in demo until a trained demo checkpoint replaces it)."""
