"""``foundation``: the agent world's stand-ins for hub checkpoints (long; its outputs ship)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
