"""Kedro pipelines: thin wiring from the catalog to the library functions."""
