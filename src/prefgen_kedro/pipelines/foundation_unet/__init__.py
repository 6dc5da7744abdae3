"""``foundation_unet``: only the base UNet remade (the other foundation models kept)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
