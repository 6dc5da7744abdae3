"""``alignment``: PrefGen step 3, the MMD-aligned MLP into the diffusion text space."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
