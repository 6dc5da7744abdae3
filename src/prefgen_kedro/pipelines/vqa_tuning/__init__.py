"""``vqa_tuning``: PrefGen step 1, preference VQA tuning of the pretrained MLLM."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
