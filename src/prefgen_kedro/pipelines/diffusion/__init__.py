"""``diffusion``: PrefGen step 4, the user cross-attention branch and its comparisons."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
