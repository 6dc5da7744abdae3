"""``data_ingestion``: the canonical tables from the agent world or Pick-a-Pic shards."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
