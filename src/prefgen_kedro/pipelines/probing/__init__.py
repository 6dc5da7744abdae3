"""``probing``: PrefGen step 2, layer-wise probes and the user embeddings."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
