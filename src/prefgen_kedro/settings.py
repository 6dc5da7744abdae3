"""Kedro project settings."""

import os
import warnings

from kedro.config import OmegaConfigLoader

# Raised when kedro-mlflow imports MLflow's model class, on every run; nothing to act on.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # `smoke` and `gpu` override single keys of base's nested parameters, not whole blocks.
    "merge_strategy": {"parameters": "soft"},
}

from prefgen_kedro.console import choose_console_logging  # noqa: E402
from prefgen_kedro.hooks import (  # noqa: E402
    ConsoleErrorHook,
    PreflightHook,
    ProvenanceHook,
    RunInfoHook,
    TrackingHook,
)

choose_console_logging()

HOOKS = (
    PreflightHook(),
    RunInfoHook(),
    ProvenanceHook(),
    TrackingHook(),
    ConsoleErrorHook(),
)

# Experiment tracking (kedro-mlflow, conf/base/mlflow.yml) unless PREFGEN_TRACKING=off.
DISABLE_HOOKS_FOR_PLUGINS = (
    ("kedro-mlflow",) if os.environ.get("PREFGEN_TRACKING", "on").lower() == "off" else ()
)
