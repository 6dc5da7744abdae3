"""How a run talks: Kedro's rich console in a terminal, one line per record everywhere else.

Off a terminal (CI, ``nohup``, ``make run > run.log``) rich wraps every record at 80 columns
and a progress bar writes a carriage-return stream, so a log file reads badly. There each
record is one line (time, level, logger, message: ``conf/logging.yml``) and a progress bar
logs one such line every few percent.

Public API: ``choose_console_logging``, ``progress``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import diffusers
import transformers
from kedro.framework.project import LOGGING
from tqdm import tqdm
from tqdm.auto import tqdm as terminal_tqdm

# Kedro's own terminal configuration (its rich_logging.yml), with the project's logger.
_RICH_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"rich": {"class": "kedro.logging.RichHandler", "rich_tracebacks": True}},
    "loggers": {"kedro": {"level": "INFO"}, "prefgen_kedro": {"level": "INFO"}},
    "root": {"handlers": ["rich"]},
}

# Libraries whose records go through the project's handlers, warnings only: MLflow's
# tracking store announces every table it creates.
_QUIET_LIBRARIES = ("mlflow", "alembic")
_PROGRESS_STEP = 0.05  # off a terminal, a progress line every 5% of the total
_UNKNOWN_TOTAL_INTERVAL_S = 10.0  # or every 10 s when the total is unknown

logger = logging.getLogger(__name__)


def choose_console_logging() -> None:
    """Kedro's rich console when stdout is a terminal; elsewhere keep ``conf/logging.yml``'s
    one line per record, with line breaks inside a message (a warning's text, a traceback)
    shown as `` ⏎ ``, and warnings logged as records; MLflow's and alembic's records go
    through the same handlers, warnings only, and the libraries' own progress bars are off.
    A ``KEDRO_LOGGING_CONFIG`` is left as the user set it."""
    if os.environ.get("KEDRO_LOGGING_CONFIG"):
        return
    for name in _QUIET_LIBRARIES:
        library = logging.getLogger(name)
        library.handlers.clear()  # MLflow installs its own, in its own format
        library.propagate = True
        library.setLevel(logging.WARNING)
    if sys.stdout.isatty():
        LOGGING.configure(_RICH_LOGGING)
        return
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None:
            handler.setFormatter(
                _OneLineFormatter(handler.formatter._fmt, handler.formatter.datefmt)
            )
    logging.captureWarnings(True)
    # Their bars (transformers' "Loading weights") redraw with carriage returns.
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


class _OneLineFormatter(logging.Formatter):
    """A record on one line. (Set in code: Kedro's logging config refuses classes of other
    packages.)"""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " ⏎ ")


class _Discard:
    """Where a logging progress bar's own drawing goes."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _LineProgress(tqdm):
    """A tqdm that, instead of redrawing, logs its status line every ``_PROGRESS_STEP`` of
    the total (every ``mininterval`` when the total is unknown)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._next_logged, self._last_logged = 0.0, None
        kwargs.setdefault("mininterval", _UNKNOWN_TOTAL_INTERVAL_S)
        super().__init__(*args, file=_Discard(), **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        finished = self.total is not None and self.n >= self.total
        if self.n == self._last_logged or (self.n < self._next_logged and not finished):
            return True
        self._last_logged = self.n
        if self.total:
            self._next_logged = self.n + _PROGRESS_STEP * self.total
        logger.info(msg or str(self))
        return True


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A progress bar (``tqdm``'s arguments): redrawn in a terminal, else a log line every
    few percent."""
    if sys.stderr.isatty():
        return terminal_tqdm(iterable, **kwargs)
    return _LineProgress(iterable, **kwargs)
