"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # `smoke` and `gpu` override single keys of base's nested parameters, not whole blocks.
    "merge_strategy": {"parameters": "soft"},
}

from prefgen_kedro.hooks import ConsoleErrorHook, ProvenanceHook, RunInfoHook  # noqa: E402

HOOKS = (RunInfoHook(), ProvenanceHook(), ConsoleErrorHook())
