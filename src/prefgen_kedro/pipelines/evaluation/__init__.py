"""``evaluation``: the benchmark of every method on held-out test users, and its report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
