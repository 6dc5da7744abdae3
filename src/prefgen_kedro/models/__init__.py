"""Torch model code with no Kedro in it: encoders, probes, adapters and metrics."""
