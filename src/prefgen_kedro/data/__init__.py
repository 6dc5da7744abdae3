"""Canonical tables and the ingestion of real preference data (Pick-a-Pic v2)."""
