"""``foundation_mllm``: only the MLLM stand-in remade (the other foundation models kept)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
